import json

import pytest
import torch

from eomt.data.build import build_dataset, build_test_loader
from eomt.evaluation.postprocess import semantic_inference
from eomt.inference import (
    predict_logits,
    predict_semantic_windows,
    resize_and_pad,
    window_starts,
)
from eomt.modeling import EoMT, build_model, build_vit
from eomt.tasks.evaluate import evaluate


def test_window_starts_cover_the_long_side_with_even_overlap():
    assert window_starts(64, 64) == [0]
    assert window_starts(128, 64) == [0, 64]  # no overlap needed
    assert window_starts(100, 64) == [0, 36]  # 28 pixels of overlap
    assert window_starts(150, 64) == [0, 43, 86]  # 42 pixels over two overlaps, 21 each
    for length in range(64, 400, 7):
        starts = window_starts(length, 64)
        assert starts[0] == 0 and starts[-1] + 64 == length
        assert all(b - a <= 64 for a, b in zip(starts, starts[1:]))


def test_resize_and_pad_keeps_the_aspect_ratio():
    image = torch.rand(3, 30, 60)
    padded, inner = resize_and_pad(image, (32, 48))
    assert padded.shape == (3, 32, 48)
    assert inner == (24, 48)
    assert padded[:, 24:].abs().sum() == 0


@pytest.fixture
def square_model():
    vit = build_vit(
        "vit_small_patch14_reg4_dinov2", (32, 32), 8, embed_dim=32, depth=2, num_heads=2
    )
    return EoMT(vit, 4, 5, num_query_blocks=1).eval()


def test_one_window_equals_single_pass(square_model):
    image = torch.rand(3, 32, 32)  # fits one window exactly: no resizing, no padding
    windowed = predict_semantic_windows(square_model, [image], 32)[-1][0]
    mask_logits, class_logits = predict_logits(square_model, [image], (32, 32))[-1][0]
    torch.testing.assert_close(windowed, semantic_inference(mask_logits, class_logits))


def test_overlapping_windows_average_their_scores(square_model, monkeypatch):
    # A 32 x 50 image gives two windows, [0, 32) and [18, 50): columns 18..31 are the average.
    image = torch.rand(3, 32, 50)
    scores = predict_semantic_windows(square_model, [image], 32)[-1][0]
    assert scores.shape == (4, 32, 50)
    left = predict_semantic_windows(square_model, [image[:, :, :32]], 32)[-1][0]
    right = predict_semantic_windows(square_model, [image[:, :, 18:]], 32)[-1][0]
    torch.testing.assert_close(scores[:, :, :18], left[:, :, :18])
    torch.testing.assert_close(scores[:, :, 32:], right[:, :, 14:])
    torch.testing.assert_close(scores[:, :, 18:32], (left[:, :, 18:] + right[:, :, :14]) / 2)
    # Tall images are windowed along their height the same way.
    tall = predict_semantic_windows(square_model, [image.transpose(1, 2)], 32)[-1][0]
    assert tall.shape == (4, 50, 32)


def canonical(results: dict) -> str:
    """An evaluator's results (numbers, per-class lists, arrays) as one comparable string."""
    return json.dumps(results, sort_keys=True, default=lambda array: array.tolist())


class FirstPredictions(torch.nn.Module):
    """The model with the prediction of its query block `block` as its final one."""

    def __init__(self, model, block: int):
        super().__init__()
        self.model, self.block = model, block

    def forward(self, images):
        return self.model(images)[: self.block + 1]


@pytest.mark.parametrize("task", ["panoptic", "semantic"])
def test_block_metrics_score_each_query_blocks_prediction(tiny_cfg, task, one_thread):
    """With masked attention at evaluation, TASK_block<i> is the score of the prediction made
    before query block i: the score of a model whose final prediction that one is."""
    torch.manual_seed(0)
    cfg = tiny_cfg(
        f"task={task}",
        f"test.metrics=[{task}]",
        "model.masked_attn=always",
        "test.score_threshold=0.0",
        "test.overlap_threshold=0.0",
    )
    model = build_model(cfg)
    with torch.no_grad():  # weights far from the initialisation: predictions that differ
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    dataset = build_dataset(cfg, train=False)
    loader = build_test_loader(cfg, dataset)
    metrics = evaluate(model, loader, cfg, dataset.categories, None, show=False)
    assert set(metrics) == {task, f"{task}_block0", f"{task}_block1"}  # L2 = 2 query blocks
    assert len({canonical(metrics[key]) for key in metrics}) == 3  # the predictions differ
    for block in (0, 1):
        alone = evaluate(FirstPredictions(model, block), loader, cfg, dataset.categories, None)
        assert canonical(alone[task]) == canonical(metrics[f"{task}_block{block}"])
    # Off without masked attention at evaluation, or when not asked for.
    unmasked = tiny_cfg(f"task={task}", f"test.metrics=[{task}]", "model.masked_attn=anneal")
    assert set(evaluate(build_model(unmasked), loader, unmasked, dataset.categories, None)) == {
        task
    }
    cfg.test.block_metrics = False
    assert set(evaluate(model, loader, cfg, dataset.categories, None, show=False)) == {task}
