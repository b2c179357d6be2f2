"""The inference runtime options (eomt/runtime.py) compute the eager float32 forward.

torch.compile is checked against eager by the CPU dry run of tools/gpu_check.py
(tests/test_gpu_check.py), which compiles once for all of its checks.
"""

import pytest
import torch

from eomt.predictor import Predictor
from eomt.runtime import WEIGHT_DTYPES, FastForward
from tests.test_model import tiny_eomt
from tests.test_predict_tool import image_dir, weights  # noqa: F401 (fixtures)


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


@pytest.mark.parametrize(
    "option, value",
    [("compile_mode", "fastest"), ("sdpa_backend", "flash2"), ("weights_dtype", "int8")],
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
    }
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
