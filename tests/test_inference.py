import pytest
import torch

from eomt.evaluation.postprocess import semantic_inference
from eomt.inference import (
    predict_logits,
    predict_semantic_windows,
    resize_and_pad,
    window_starts,
)
from eomt.modeling import EoMT, build_vit


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
    windowed = predict_semantic_windows(square_model, [image], 32)[0]
    mask_logits, class_logits = predict_logits(square_model, [image], (32, 32))[0]
    torch.testing.assert_close(windowed, semantic_inference(mask_logits, class_logits))


def test_overlapping_windows_average_their_scores(square_model, monkeypatch):
    # A 32 x 50 image gives two windows, [0, 32) and [18, 50): columns 18..31 are the average.
    image = torch.rand(3, 32, 50)
    scores = predict_semantic_windows(square_model, [image], 32)[0]
    assert scores.shape == (4, 32, 50)
    left = predict_semantic_windows(square_model, [image[:, :, :32]], 32)[0]
    right = predict_semantic_windows(square_model, [image[:, :, 18:]], 32)[0]
    torch.testing.assert_close(scores[:, :, :18], left[:, :, :18])
    torch.testing.assert_close(scores[:, :, 32:], right[:, :, 14:])
    torch.testing.assert_close(scores[:, :, 18:32], (left[:, :, 18:] + right[:, :, :14]) / 2)
    # Tall images are windowed along their height the same way.
    tall = predict_semantic_windows(square_model, [image.transpose(1, 2)], 32)[0]
    assert tall.shape == (4, 50, 32)
