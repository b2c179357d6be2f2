"""Paths that only a GPU runs: bf16 autocast, the fused attention kernels, compiled and
graph-replayed forwards. Skipped on CPU; tools/gpu_check.py runs them (pytest -m gpu)."""

import copy

import pytest
import torch

from eomt.deploy.runtime import FastForward
from eomt.inference import predict_logits
from tests.test_model import tiny_eomt

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_bf16_inference_is_close_to_float32():
    model = tiny_eomt("anneal").cuda().eval()
    images = [torch.rand(3, 32, 48, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    reference = predict_logits(model, images, (32, 48), amp="none")[-1]
    low = predict_logits(model, images, (32, 48), amp="bf16")[-1]
    for (mask_ref, class_ref), (mask_bf16, class_bf16) in zip(reference, low):
        assert mask_bf16.dtype == torch.float32  # post-processing always sees float32
        torch.testing.assert_close(mask_bf16, mask_ref, atol=0.1, rtol=0.05)
        torch.testing.assert_close(class_bf16, class_ref, atol=0.1, rtol=0.05)


def test_masked_training_step_backpropagates_in_bf16():
    model = tiny_eomt("anneal").cuda().train()
    model.attn_mask_probs.fill_(0.5)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        predictions = model(torch.rand(2, 3, 32, 48, device="cuda"))
    sum(p["mask_logits"].float().mean() for p in predictions).backward()
    assert torch.isfinite(model.queries.weight.grad).all()


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected).norm() / expected.norm())


@pytest.mark.parametrize(
    "compile_mode, sdpa_backend, weights_dtype, autocast",
    [
        ("none", "auto", "fp32", "bf16"),
        ("none", "flash", "bf16", "none"),
        ("none", "flash", "fp32", "bf16"),
        ("none", "efficient", "fp32", "none"),
        ("none", "cudnn", "bf16", "none"),
        ("none", "auto", "fp16", "none"),
        ("default", "auto", "bf16", "none"),
        ("default", "auto", "fp32", "bf16"),
        ("reduce-overhead", "auto", "bf16", "none"),
    ],
)
def test_fast_paths_compute_the_eager_float32_forward(
    compile_mode, sdpa_backend, weights_dtype, autocast
):
    torch._dynamo.reset()
    model = tiny_eomt("anneal").cuda().eval()
    images = torch.rand(2, 3, 32, 48, device="cuda")
    with torch.no_grad():
        expected = model(images)[-1]
        forward = FastForward(
            copy.deepcopy(model), compile_mode, sdpa_backend, weights_dtype, autocast
        )
        for _ in range(3):  # compiled and graph-replayed paths settle after a few calls
            got = forward(images)[-1]
    for key in expected:
        assert relative_error(got[key], expected[key]) < 3e-2


def test_graph_replays_hand_out_outputs_that_the_next_replay_keeps():
    torch._dynamo.reset()
    model = tiny_eomt("anneal").cuda().eval()
    forward = FastForward(copy.deepcopy(model), "reduce-overhead")
    first, second = (torch.rand(1, 3, 32, 48, device="cuda") for _ in range(2))
    with torch.no_grad():
        for _ in range(3):
            kept = forward(first)[-1]["mask_logits"]
            forward(second)
        expected = model(first)[-1]["mask_logits"]
    assert relative_error(kept, expected) < 1e-3
