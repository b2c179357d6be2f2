import math

import pytest
import torch

from eomt.evaluation.postprocess import instance_inference, panoptic_inference, semantic_inference

LOG = math.log


def test_semantic_inference_hand_computed():
    # Class probabilities over (class 0, class 1, no-object):
    #   query 0: softmax(log 2, 0, 0) = (1/2, 1/4, 1/4)
    #   query 1: softmax(0, log 3, 0) = (1/5, 3/5, 1/5)
    class_logits = torch.tensor([[LOG(2), 0.0, 0.0], [0.0, LOG(3), 0.0]])
    # Three pixels; sigmoid(+-30) is 1 / 0 to float32 precision and sigmoid(0) = 1/2.
    mask_logits = torch.tensor([[[30.0, 0.0, -30.0]], [[-30.0, 30.0, -30.0]]])
    scores = semantic_inference(mask_logits, class_logits)
    # pixel 0: only query 0 -> (1/2, 1/4)
    # pixel 1: 1/2 * (1/2, 1/4) + 1 * (1/5, 3/5) = (0.45, 0.725)
    # pixel 2: no query -> (0, 0)
    expected = torch.tensor([[[0.5, 0.45, 0.0]], [[0.25, 0.725, 0.0]]])
    assert scores.shape == (2, 1, 3)
    torch.testing.assert_close(scores, expected, atol=1e-6, rtol=0)
    assert scores.argmax(0)[0, :2].tolist() == [0, 1]


def test_semantic_inference_rejects_mismatched_queries():
    with pytest.raises(ValueError, match="queries"):
        semantic_inference(torch.zeros(3, 2, 2), torch.zeros(2, 4))


def _instance_inputs():
    # Class probabilities (class 0, class 1, no-object):
    #   query 0: (0.6, 0.3, 0.1), query 1: (0.1, 0.8, 0.1), query 2: (0.2, 0.2, 0.6)
    class_logits = torch.tensor(
        [[LOG(6), LOG(3), LOG(1)], [LOG(1), LOG(8), LOG(1)], [LOG(2), LOG(2), LOG(6)]]
    )
    mask_logits = torch.tensor(
        [
            [[LOG(3), 30.0], [-30.0, -30.0]],  # 2 pixels, sigmoids 0.75 and 1 -> mean 0.875
            [[-30.0, -30.0], [-30.0, -30.0]],  # empty mask -> mask score 0
            [[30.0, 30.0], [30.0, 30.0]],  # full mask, mean sigmoid 1
        ]
    )
    return mask_logits, class_logits


def test_instance_inference_topk_order_and_scores():
    mask_logits, class_logits = _instance_inputs()
    result = instance_inference(mask_logits, class_logits, topk=3)
    # Best pairs: (q1, c1) 0.8, (q0, c0) 0.6, (q0, c1) 0.3.
    assert result["labels"].tolist() == [1, 0, 1]
    assert result["labels"].dtype == torch.int64
    assert result["masks"].dtype == torch.bool
    assert result["masks"][0].sum() == 0
    assert result["masks"][1].tolist() == [[True, True], [False, False]]
    # Scores: 0.8 * 0 (empty mask), 0.6 * 0.875, 0.3 * 0.875.
    torch.testing.assert_close(result["scores"], torch.tensor([0.0, 0.525, 0.2625]))


def test_instance_inference_restricted_to_thing_classes():
    mask_logits, class_logits = _instance_inputs()
    result = instance_inference(mask_logits, class_logits, topk=2, thing_classes=[0])
    # Class-0 candidates: q0 0.6, q2 0.2, q1 0.1 -> top two are q0 and q2.
    assert result["labels"].tolist() == [0, 0]
    torch.testing.assert_close(result["scores"], torch.tensor([0.525, 0.2]))
    # topk larger than the number of candidates returns them all.
    assert len(instance_inference(mask_logits, class_logits, topk=100)["scores"]) == 6


def _probs_to_logits(*probabilities):
    return torch.tensor([[LOG(p) for p in row] for row in probabilities])


def test_panoptic_overlap_drop_and_segment_pixels():
    # Two thing queries on a 1x5 image. Query 0 (score 0.95) covers pixels 0-2, query 1
    # (score 0.9) pixels 1-4; query 0 wins the shared pixels 1-2.
    class_logits = _probs_to_logits((0.95, 0.025, 0.025), (0.05, 0.9, 0.05))
    mask_logits = torch.tensor([[[10.0, 10.0, 10.0, -10.0, -10.0]], [[-10, 10, 10, 10, 10.0]]])
    is_thing = [True, True]

    # Query 1 owns 2 of its 4 foreground pixels: 2 / 4 < 0.8, dropped.
    seg, segments = panoptic_inference(mask_logits, class_logits, is_thing)
    assert seg.dtype == torch.int32
    assert seg.tolist() == [[1, 1, 1, 0, 0]]
    assert [(s["id"], s["category_id"], s["isthing"]) for s in segments] == [(1, 0, 1)]
    assert segments[0]["score"] == pytest.approx(0.95)
    assert segments[0]["iscrowd"] == 0

    # With a lower overlap threshold (2 / 4 >= 0.4) it keeps the pixels it owns, 3 and 4.
    seg, segments = panoptic_inference(mask_logits, class_logits, is_thing, overlap_threshold=0.4)
    assert seg.tolist() == [[1, 1, 1, 2, 2]]
    assert [s["category_id"] for s in segments] == [0, 1]


def test_panoptic_segment_excludes_owned_background():
    # One query whose foreground is pixels 0-1: it owns every pixel (the only kept query) but
    # its segment is only where sigmoid >= 0.5. Owned 3 / foreground 2 >= 0.8, kept.
    class_logits = _probs_to_logits((0.9, 0.05, 0.05))
    mask_logits = torch.tensor([[[5.0, 0.0, -5.0]]])
    seg, segments = panoptic_inference(mask_logits, class_logits, [True, False])
    assert seg.tolist() == [[1, 1, 0]]
    assert len(segments) == 1


def test_panoptic_stuff_merging():
    # Two queries of class 1 on disjoint halves of a 1x4 image.
    class_logits = _probs_to_logits((0.05, 0.9, 0.05), (0.02, 0.95, 0.03))
    mask_logits = torch.tensor([[[10.0, 10.0, -10.0, -10.0]], [[-10.0, -10.0, 10.0, 10.0]]])

    seg, segments = panoptic_inference(mask_logits, class_logits, [True, False])
    assert seg.tolist() == [[1, 1, 1, 1]]
    assert len(segments) == 1
    assert segments[0]["isthing"] == 0
    assert segments[0]["score"] == pytest.approx(0.95)  # the highest merged score

    # The same class as a thing keeps two instances.
    seg, segments = panoptic_inference(mask_logits, class_logits, [True, True])
    assert seg.tolist() == [[1, 1, 2, 2]]
    assert [s["id"] for s in segments] == [1, 2]


def test_panoptic_score_threshold_and_no_object():
    # Query 0: best class prob 0.7 <= 0.8. Query 1: most likely "no object".
    class_logits = _probs_to_logits((0.7, 0.2, 0.1), (0.02, 0.03, 0.95))
    mask_logits = torch.full((2, 2, 2), 10.0)
    seg, segments = panoptic_inference(mask_logits, class_logits, [True, True])
    assert segments == []
    assert (seg == 0).all()
    # Lowering the threshold keeps query 0 but never the no-object query.
    seg, segments = panoptic_inference(mask_logits, class_logits, [True, True], score_threshold=0.5)
    assert [s["category_id"] for s in segments] == [0]
    assert (seg == 1).all()


def test_panoptic_is_thing_length_checked():
    with pytest.raises(ValueError, match="is_thing"):
        panoptic_inference(torch.zeros(1, 2, 2), torch.zeros(1, 3), [True])
