"""Paths that only a GPU runs: bf16 autocast and the fused attention kernels. Skipped on CPU."""

import pytest
import torch

from eomt.inference import predict_logits
from tests.test_model import tiny_eomt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_bf16_inference_is_close_to_float32():
    model = tiny_eomt("anneal").cuda().eval()
    images = [torch.rand(3, 32, 48, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    reference = predict_logits(model, images, (32, 48), amp="none")
    low = predict_logits(model, images, (32, 48), amp="bf16")
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
