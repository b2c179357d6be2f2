"""The inference runtime options (eomt/deploy/runtime.py) compute the eager float32 forward.

torch.compile is checked against eager by the CPU dry run of tools/gpu_check.py
(tests/test_gpu_check.py), which compiles once for all of its checks.
"""

import pytest
import torch
from torch import nn

from eomt.deploy.predictor import Predictor
from eomt.deploy.runtime import (
    WEIGHT_DTYPES,
    FastForward,
    default_autocast,
    precision_name,
    replays_cuda_graphs,
)
from tests.test_model import tiny_eomt
from tests.test_predict_tool import image_dir, weights  # noqa: F401 (fixtures)
from tools import benchmark as benchmark_tool
from tools import predict as predict_tool


@pytest.fixture
def images():
    return torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))


def reference(images):
    torch.manual_seed(0)
    model = tiny_eomt().eval()
    with torch.no_grad():
        return model, model(images)[-1]


def test_eager_with_each_cpu_attention_kernel_is_the_plain_forward(images):
    model, expected = reference(images)
    for backend in ("auto", "math"):
        with torch.no_grad():
            got = FastForward(model, sdpa_backend=backend)(images)[-1]
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_weights_are_cast_once_and_stay_within_half_precision(images, dtype):
    model, expected = reference(images)
    forward = FastForward(model, weights_dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {WEIGHT_DTYPES[dtype]}
    with torch.no_grad():
        got = forward(images)[-1]  # float32 images are cast to the weights' dtype
    for key in expected:
        assert got[key].dtype == WEIGHT_DTYPES[dtype]
        error = (got[key].float() - expected[key]).norm() / expected[key].norm()
        assert 1e-5 < error < 3e-2  # half precision: not float32, not wrong


def test_autocast_is_applied_inside_the_forward_and_turned_off_without_it():
    linear = nn.Linear(4, 4)
    inputs = torch.rand(2, 4)
    with torch.no_grad():
        assert FastForward(linear, autocast="bf16")(inputs).dtype == torch.bfloat16
        # "none" is float32 even inside an autocast: the reported precision is what ran.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert FastForward(linear)(inputs).dtype == torch.float32


def test_bf16_autocast_stays_within_bf16_of_the_float32_forward(images):
    model, expected = reference(images)
    forward = FastForward(model, autocast="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # weights stay float32
    with torch.no_grad():
        got = forward(images)[-1]
    for key in expected:
        error = (got[key].float() - expected[key]).norm() / expected[key].norm()
        assert 1e-5 < error < 3e-2


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_autocast_over_cast_weights_is_refused(dtype):
    with pytest.raises(ValueError, match=f"autocast bf16 with {dtype} weights would recast"):
        FastForward(tiny_eomt(), weights_dtype=dtype, autocast="bf16")
    # The tools refuse it as an argument error, before loading anything.
    for tool, required in (
        (benchmark_tool, ["--config-file", "x.yaml"]),
        (predict_tool, ["--weights", "w.pth", "--input", "x.png", "--output", "out"]),
    ):
        with pytest.raises(SystemExit):
            tool.parse_args([*required, "--weights-dtype", dtype, "--autocast", "fp16"])
        assert tool.parse_args([*required, "--autocast", "fp16"]).autocast == "fp16"


def test_each_precision_is_named_as_it_runs():
    assert precision_name("fp32", "none") == "fp32"
    assert precision_name("bf16", "none") == "bf16 weights"
    assert precision_name("fp32", "bf16") == "fp32 weights + bf16 autocast"
    forward = FastForward(tiny_eomt(), autocast="fp16")
    assert forward.describe()["precision"] == "fp32 weights + fp16 autocast"


def test_tools_autocast_by_default_where_the_paper_did():
    assert default_autocast("cuda", "fp32", "bf16") == "bf16"
    assert default_autocast("cuda", "bf16", "bf16") == "none"  # weights already cast
    assert default_autocast("cpu", "fp32", "bf16") == "none"
    assert default_autocast("cuda", "fp32", "none") == "none"  # a config trained without AMP


def test_compile_modes_that_replay_cuda_graphs_follow_inductor_options(monkeypatch):
    assert replays_cuda_graphs("reduce-overhead") and replays_cuda_graphs("max-autotune")
    for mode in ("none", "default", "max-autotune-no-cudagraphs"):
        assert not replays_cuda_graphs(mode), mode
    # Read from inductor's options of the mode, not from its name.
    import torch._inductor

    monkeypatch.setattr(
        torch._inductor, "list_mode_options", lambda mode: {"triton.cudagraphs": mode == "default"}
    )
    assert replays_cuda_graphs("default") and not replays_cuda_graphs("reduce-overhead")


@pytest.mark.parametrize(
    "option, value",
    [
        ("compile_mode", "fastest"),
        ("sdpa_backend", "flash2"),
        ("weights_dtype", "int8"),
        ("autocast", "fp8"),
    ],
)
def test_unknown_options_are_refused_by_name(option, value):
    with pytest.raises(ValueError, match=f"{option} must be one of .* got '{value}'"):
        FastForward(tiny_eomt(), **{option: value})


def test_predictor_runs_its_model_through_the_options(weights, image_dir):  # noqa: F811
    plain = Predictor.from_checkpoint(weights, device="cpu")
    half = Predictor.from_checkpoint(
        weights, device="cpu", weights_dtype="bf16", sdpa_backend="math"
    )
    assert half.forward.describe() == {
        "compile_mode": "none",
        "sdpa_backend": "math",
        "weights_dtype": "bf16",
        "autocast": "none",
        "precision": "bf16 weights",
    }
    assert plain.forward.autocast == "none"  # on a CPU, as evaluation runs
    assert half.model.queries.weight.dtype == torch.bfloat16
    path = next(image_dir.glob("a.png"))
    plain_labels, half_labels = plain(path, "semantic"), half(path, "semantic")
    assert plain_labels.shape == half_labels.shape
    assert (plain_labels == half_labels).float().mean() > 0.9
    masks, classes, _, _ = half.query_predictions(path, num_queries=2)  # the masked path too
    assert masks.dtype == classes.dtype == torch.float32


@pytest.mark.parametrize("mode", ["anneal", "never"])
def test_the_inference_forward_compiles_as_one_graph(images, mode):
    # No graph break: no host synchronisation or data-dependent Python in the forward that
    # torch.compile and CUDA graphs run.
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(tiny_eomt(mode).eval())(images)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0


def test_predict_tool_runs_and_says_the_precision_asked_for(weights, image_dir, tmp_path, capsys):  # noqa: F811
    argv = ["--weights", str(weights), "--input", str(image_dir / "a.png")]
    argv += ["--output", str(tmp_path), "--device", "cpu", "--no-overlay", "--quiet"]
    predict_tool.main(predict_tool.parse_args([*argv, "--autocast", "bf16"]))
    assert (
        capsys.readouterr().out.rstrip().endswith("the model ran in fp32 weights + bf16 autocast")
    )
    assert (tmp_path / "panoptic" / "a.png").is_file()
