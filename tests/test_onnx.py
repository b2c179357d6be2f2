"""ONNX export of the inference graph, checked with onnxruntime against PyTorch."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from eomt.cli import run_tool
from eomt.deploy.onnx_export import (
    Comparison,
    InferenceGraph,
    check,
    check_failures,
    check_inputs,
    export,
    onnx_provider,
)
from eomt.weights.files import save_weights
from tests.test_weights import CLASSES, DINOV2, DINOV3, QUERIES, SIZE, tiny_model
from tools.export_onnx import main, parse_args

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

TOLERANCE = 1e-4  # float32 logits of order 1-10; observed differences are about 1e-6


@pytest.mark.parametrize("backbone", [DINOV2, DINOV3])
def test_exported_graph_matches_pytorch(tmp_path, backbone):
    model, _ = tiny_model(backbone)
    path = export(model, tmp_path / "eomt.onnx", (SIZE, SIZE))
    comparisons = check(model, path, check_inputs((SIZE, SIZE)))
    assert set(comparisons) == {"random batch", "synthetic scene"}
    assert max(c.difference for c in comparisons.values()) < TOLERANCE
    assert max(c.relative for c in comparisons.values()) < 1e-5
    assert comparisons["synthetic scene"].agreement == 1.0
    assert comparisons["random batch"].agreement is None  # noise has no labels to agree on
    # The batch dimension is dynamic, and the graph is the unmasked final prediction.
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = torch.rand(3, 3, SIZE, SIZE)
    mask_logits, class_logits = session.run(None, {"images": images.numpy()})
    assert mask_logits.shape == (3, QUERIES, SIZE // 4, SIZE // 4)
    assert class_logits.shape == (3, QUERIES, CLASSES + 1)
    model.masked_attn = "anneal"
    with torch.no_grad():
        expected = model(images)[-1]["class_logits"].numpy()
    assert np.abs(class_logits - expected).max() < TOLERANCE


def _weights(tmp_path, scale: float = 1.0):
    """A tiny model's file; `scale` multiplies its class and mask logits."""
    model, cfg = tiny_model()
    with torch.no_grad():
        for layer in (model.class_head, model.mask_head[-1]):
            layer.weight.mul_(scale)
            layer.bias.mul_(scale)
    return save_weights(model, cfg, None, tmp_path / "model.safetensors")


def test_export_tool_from_a_checkpoint(tmp_path, capsys):
    output = tmp_path / "new" / "folder" / "m.onnx"  # folders that do not exist yet
    args = ["--weights", str(_weights(tmp_path)), "--output", str(output)]
    comparisons = main(parse_args(args))
    assert max(c.relative for c in comparisons.values()) < 1e-4
    assert output.is_file()
    out = capsys.readouterr().out
    assert f"checked with onnxruntime ({onnx_provider()}) against PyTorch float32:" in out
    assert "  synthetic scene: largest difference " in out
    assert "semantic labels agree on 100.00% of pixels" in out
    assert "check passed: differences within 0.0001 of each output's scale" in out
    # Masked attention is off in the graph whatever the model's mode.
    model, _ = tiny_model()
    graph = InferenceGraph(model)
    assert graph.model.masked_attn == "never" and not graph.model.training


def test_fp16_graph_takes_and_returns_float16_and_leaves_the_model_float32(tmp_path):
    import onnx

    model, _ = tiny_model()
    path = export(model, tmp_path / "eomt_fp16.onnx", (SIZE, SIZE), precision="fp16")
    assert next(model.parameters()).dtype == torch.float32
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    float16 = onnx.TensorProto.FLOAT16
    assert graph.graph.input[0].type.tensor_type.elem_type == float16
    assert all(out.type.tensor_type.elem_type == float16 for out in graph.graph.output)
    assert {init.data_type for init in graph.graph.initializer if init.dims} == {float16}
    # Against PyTorch in float32: half precision, within 1% of the logits' scale.
    comparisons = check(model, path, check_inputs((SIZE, SIZE)))
    assert 0 < max(c.relative for c in comparisons.values()) < 1e-2
    assert comparisons["synthetic scene"].agreement >= 0.99


def test_fp16_check_is_relative_to_the_logits_scale_and_names_the_picture(tmp_path, capsys):
    """Logits of order 100 (a trained model reaches 60): float16 rounds them by more than an
    absolute 5e-2, a small fraction of their scale, and the labels agree: the check passes."""
    weights = _weights(tmp_path, scale=200)
    picture = tmp_path / "my photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), np.uint8)).save(picture)
    output = tmp_path / "h.onnx"
    args = ["--weights", str(weights), "--output", str(output), "--precision", "fp16"]
    comparisons = main(parse_args([*args, "--image", str(picture)]))
    assert set(comparisons) == {"random batch", "my photo.png"}  # the user's picture by name
    assert max(c.difference for c in comparisons.values()) > 5e-2  # the old absolute check
    assert max(c.relative for c in comparisons.values()) < 1e-2
    assert comparisons["my photo.png"].agreement >= 0.99
    out = capsys.readouterr().out
    assert f"({onnx_provider()})" in out and "  my photo.png: largest difference " in out
    assert output.is_file()


def test_a_graph_that_fails_its_check_is_renamed_and_named(tmp_path):
    output = tmp_path / "h.onnx"
    args = ["--weights", str(_weights(tmp_path)), "--output", str(output), "--precision", "fp16"]
    message = (
        rf"error: {output} failed its check \(random batch: relative difference .* of the "
        rf".* > 1e-06; synthetic scene: .*\); renamed to {output}.failed$"
    )
    with pytest.raises(SystemExit, match=message):
        main(parse_args([*args, "--relative-tolerance", "1e-6"]))
    assert not output.exists() and (tmp_path / "h.onnx.failed").is_file()


def test_check_failures_by_relative_difference_and_label_agreement():
    comparisons = {
        "a.jpg": Comparison("mask logits", difference=0.3, scale=60.0, agreement=0.995),
        "b.jpg": Comparison("class logits", difference=0.3, scale=6.0, agreement=0.97),
        "random batch": Comparison("mask logits", float("nan"), 60.0, None),
    }
    assert check_failures(comparisons, relative_tolerance=1e-2, min_agreement=0.99) == [
        "b.jpg: relative difference 5.00e-02 of the class logits > 0.01",
        "b.jpg: semantic labels agree on 97.00% of pixels < 99%",
        "random batch: relative difference nan of the mask logits > 0.01",
    ]
    assert check_failures({"a.jpg": comparisons["a.jpg"]}, 1e-2, 0.99) == []  # 0.5% of 60


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--weights", "missing.pth"], "error: checkpoint not found: missing.pth"),
        (["--image", "gone.jpg"], "error: .*gone.jpg"),
        (["--no-check", "--image", "a.jpg"], "error: --image is for the check, which --no-check"),
        (["--relative-tolerance", "0"], "error: --relative-tolerance must be > 0, got 0"),
        (["--min-agreement", "1.5"], r"error: --min-agreement must be in \(0, 1\], got 1.5"),
        (["--precision", "fp8"], "error: argument --precision: invalid choice: 'fp8'"),
    ],
    ids=["weights", "image", "no-check", "tolerance", "agreement", "precision"],
)
def test_user_errors_are_one_line(tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    weights = ["--weights", str(_weights(tmp_path))]
    with pytest.raises(SystemExit) as caught:
        run_tool(main, parse_args, [*weights, "--output", "m.onnx", *extra])
    assert caught.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert re.match(message, line), line
    assert not (tmp_path / "m.onnx").exists()


def test_an_unwritable_output_is_one_line(tmp_path, capsys, read_only):
    read_only(tmp_path / "ro")
    args = ["--weights", str(_weights(tmp_path)), "--output", str(tmp_path / "ro" / "m.onnx")]
    with pytest.raises(SystemExit) as caught:
        run_tool(main, parse_args, args)
    assert caught.value.code == 2
    assert capsys.readouterr().err == f"error: [Errno 13] Permission denied: '{tmp_path / 'ro'}'\n"
