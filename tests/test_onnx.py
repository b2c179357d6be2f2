"""ONNX export of the inference graph, checked with onnxruntime against PyTorch."""

import numpy as np
import pytest
import torch

from eomt.deploy.onnx_export import InferenceGraph, check, check_inputs, export, onnx_provider
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
    differences = check(model, path, check_inputs((SIZE, SIZE)))
    assert set(differences) == {"random", "real-looking"}
    assert max(differences.values()) < TOLERANCE
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


def test_export_tool_from_a_checkpoint(tmp_path, capsys):
    model, cfg = tiny_model()
    save_weights(model, cfg, None, tmp_path / "model.safetensors")
    output = tmp_path / "new" / "folder" / "m.onnx"  # folders that do not exist yet
    args = ["--weights", str(tmp_path / "model.safetensors"), "--output", str(output)]
    differences = main(parse_args(args))
    assert max(differences.values()) < 1e-3
    assert output.is_file()
    assert (
        f"real-looking: max |onnxruntime ({onnx_provider()}) - PyTorch|" in capsys.readouterr().out
    )
    # Masked attention is off in the graph whatever the model's mode.
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
    # Against PyTorch in float32: half precision, logits of order 1-10.
    differences = check(model, path, check_inputs((SIZE, SIZE)))
    assert 0 < max(differences.values()) < 5e-2


def test_export_tool_checks_fp16_with_its_tolerance(tmp_path, capsys):
    model, cfg = tiny_model()
    save_weights(model, cfg, None, tmp_path / "model.safetensors")
    args = ["--weights", str(tmp_path / "model.safetensors"), "--output", str(tmp_path / "h.onnx")]
    main(parse_args([*args, "--precision", "fp16"]))
    assert f"({onnx_provider()})" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="> tolerance 1e-06"):
        main(parse_args([*args, "--precision", "fp16", "--tolerance", "1e-6"]))
