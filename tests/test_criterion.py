import math

import pytest
import torch
import torch.nn.functional as F

from eomt.modeling.criterion import (
    HungarianMatcher,
    MaskClassificationLoss,
    point_sample,
    sample_uncertain_points,
)


def full_mask(size: int) -> torch.Tensor:
    return torch.ones(size, size, dtype=torch.bool)


def constant_logits(values: torch.Tensor, size: int = 4) -> torch.Tensor:
    """Mask logits (B, K, size, size) constant over each map: every sampled point sees the same
    value, so with full or empty targets the loss does not depend on the random points."""
    return values[:, :, None, None].expand(-1, -1, size, size).clone()


def test_point_sample_hand_values_and_shared_equals_per_map_points():
    maps = torch.tensor([[[0.0, 1.0], [2.0, 3.0]], [[4.0, 4.0], [0.0, 0.0]]])
    # (x, y): pixel centres, midpoints, and image corners (border padding keeps the edge value).
    points = torch.tensor(
        [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.5, 0.25], [0.5, 0.5], [0.0, 0.0], [1.0, 1.0]]
    )
    expected = torch.tensor(
        [[0.0, 1.0, 2.0, 0.5, 1.5, 0.0, 3.0], [4.0, 4.0, 0.0, 4.0, 2.0, 4.0, 0.0]]
    )
    torch.testing.assert_close(point_sample(maps, points), expected)
    torch.testing.assert_close(point_sample(maps, points.expand(2, -1, -1)), expected)


def test_shared_points_give_the_values_of_the_maps_sampled_as_channels_of_one_input():
    """The matcher's sampling, one map per batch item since it is faster, keeps every value of
    the earlier layout (all maps as channels, one grid) to the bit: the same matching."""
    torch.manual_seed(0)
    maps, points = torch.randn(7, 33, 41), torch.rand(500, 2)
    channels = F.grid_sample(
        maps[None],
        (2 * points - 1).view(1, 1, -1, 2),
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    ).view(7, 500)
    assert torch.equal(point_sample(maps, points), channels)


def test_sample_uncertain_points_concentrate_where_logits_are_near_zero():
    torch.manual_seed(0)
    logits = torch.zeros(2, 8, 8)
    logits[0, :, 4:] = 10.0  # mask 0 uncertain (exactly 0) for x <= 3.5 / 8
    logits[1, :, :4] = -10.0  # mask 1 uncertain for x >= 4.5 / 8
    points = sample_uncertain_points(
        logits, num_points=1000, oversample_ratio=3.0, importance_sample_ratio=0.75
    )
    assert points.shape == (2, 1000, 2)
    assert points.min() >= 0.0 and points.max() <= 1.0
    assert (points[0, :750, 0] <= 3.5 / 8).all()
    assert (points[1, :750, 0] >= 4.5 / 8).all()
    # The remaining quarter is uniform: it reaches the confident side too.
    assert (points[0, 750:, 0] > 4.5 / 8).any()


def test_cost_matrix_matches_loop_reference():
    torch.manual_seed(0)
    num_queries, num_targets, num_points = 3, 2, 50
    mask_logits = torch.randn(num_queries, 4, 4) * 3
    class_logits = torch.randn(num_queries, 5)
    target_masks = torch.rand(num_targets, 8, 8) > 0.5
    target_labels = torch.tensor([3, 1])
    points = torch.rand(num_points, 2)
    matcher = HungarianMatcher(class_weight=1.5, mask_weight=3.0, dice_weight=0.5)

    cost = matcher.cost_matrix(mask_logits, class_logits, target_masks, target_labels, points)

    expected = torch.zeros(num_queries, num_targets)
    for query in range(num_queries):
        logits = point_sample(mask_logits[query : query + 1], points)[0]
        for target in range(num_targets):
            values = point_sample(target_masks[target : target + 1].float(), points)[0]
            bce = F.binary_cross_entropy_with_logits(logits, values)
            probs = logits.sigmoid()
            dice = 1 - (2 * (probs * values).sum() + 1) / (probs.sum() + values.sum() + 1)
            class_prob = class_logits[query].softmax(-1)[target_labels[target]]
            expected[query, target] = -1.5 * class_prob + 3.0 * bce + 0.5 * dice
    torch.testing.assert_close(cost, expected)


def test_matcher_recovers_permutation_and_handles_image_without_targets():
    torch.manual_seed(0)
    num_classes, num_queries = 4, 6
    quadrants = torch.zeros(4, 16, 16, dtype=torch.bool)
    quadrants[0, :8, :8] = quadrants[1, :8, 8:] = quadrants[2, 8:, :8] = quadrants[3, 8:, 8:] = True
    labels = torch.tensor([2, 0, 3, 1])
    query_of_target = [4, 1, 5, 2]

    # Predictions at 1/4 resolution; unused queries predict no-object with empty masks.
    mask_logits = torch.full((2, num_queries, 4, 4), -8.0)
    class_logits = torch.zeros(2, num_queries, num_classes + 1)
    class_logits[:, :, num_classes] = 8.0
    for target, query in enumerate(query_of_target):
        small_mask = F.interpolate(quadrants[None, target : target + 1].float(), size=(4, 4))[0, 0]
        mask_logits[0, query] = torch.where(small_mask > 0.5, 8.0, -8.0)
        class_logits[0, query] = 0.0
        class_logits[0, query, labels[target]] = 8.0
    targets = [
        {"masks": quadrants, "labels": labels},
        {"masks": torch.zeros(0, 16, 16, dtype=torch.bool), "labels": torch.zeros(0).long()},
    ]

    indices = HungarianMatcher(num_points=256)(mask_logits, class_logits, targets)

    query_idx, target_idx = indices[0]
    assert query_idx.dtype == target_idx.dtype == torch.int64
    assert dict(zip(target_idx.tolist(), query_idx.tolist())) == dict(enumerate(query_of_target))
    assert indices[1][0].numel() == indices[1][1].numel() == 0


def test_mask_and_class_losses_hand_computed():
    num_classes, num_points = 3, 64
    criterion = MaskClassificationLoss(num_classes, num_points=num_points, no_object_weight=0.1)
    # Two identical images, each with one full target of class 0: query 0 matches it.
    mask_logits = constant_logits(torch.tensor([[1.5, -3.0], [1.5, -3.0]]))
    class_logits = torch.tensor([[[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 1.0]]]).repeat(2, 1, 1)
    targets = [{"masks": full_mask(8)[None], "labels": torch.tensor([0])} for _ in range(2)]

    losses = criterion([{"mask_logits": mask_logits, "class_logits": class_logits}], targets)

    prob = 1 / (1 + math.exp(-1.5))
    expected_mask = math.log(1 + math.exp(-1.5))  # BCE(1.5, 1), normalised by 2 masks
    expected_dice = 1 - (2 * num_points * prob + 1) / (num_points * prob + num_points + 1)
    nll_matched = -torch.log_softmax(class_logits[0, 0], 0)[0].item()
    nll_unmatched = -torch.log_softmax(class_logits[0, 1], 0)[num_classes].item()
    expected_class = (nll_matched + 0.1 * nll_unmatched) / 1.1
    assert losses["loss_mask_0"].item() == pytest.approx(expected_mask, rel=1e-5)
    assert losses["loss_dice_0"].item() == pytest.approx(expected_dice, rel=1e-5)
    assert losses["loss_class_0"].item() == pytest.approx(expected_class, rel=1e-5)
    assert losses["loss"].item() == pytest.approx(
        5 * expected_mask + 5 * expected_dice + 2 * expected_class, rel=1e-5
    )


def test_mask_losses_are_normalised_by_targets_not_matches():
    # One query, two full targets: only one pair is matched, yet the sum is divided by 2.
    criterion = MaskClassificationLoss(num_classes=2, num_points=32)
    prediction = {
        "mask_logits": constant_logits(torch.tensor([[0.5]])),
        "class_logits": torch.tensor([[[1.0, 0.0, 0.0]]]),
    }
    targets = [{"masks": torch.stack([full_mask(8), full_mask(8)]), "labels": torch.tensor([0, 1])}]
    losses = criterion([prediction], targets)
    assert losses["loss_mask_0"].item() == pytest.approx(math.log(1 + math.exp(-0.5)) / 2)


def test_perfect_prediction_has_near_zero_loss_and_wrong_one_does_not():
    torch.manual_seed(0)
    num_classes = 3
    criterion = MaskClassificationLoss(num_classes, num_points=256)
    targets = [
        {"masks": full_mask(16)[None], "labels": torch.tensor([2])},
        {"masks": full_mask(16)[None], "labels": torch.tensor([0])},
    ]
    # Query 1 of image 0 and query 3 of image 1 are the objects; the rest predict no-object.
    object_queries = [(0, 1, 2), (1, 3, 0)]
    mask_logits = torch.full((2, 4, 4, 4), -20.0)
    class_logits = torch.zeros(2, 4, num_classes + 1)
    class_logits[:, :, num_classes] = 20.0
    for image, query, label in object_queries:
        mask_logits[image, query] = 20.0
        class_logits[image, query] = 0.0
        class_logits[image, query, label] = 20.0
    perfect = criterion([{"mask_logits": mask_logits, "class_logits": class_logits}], targets)
    for value in perfect.values():
        assert 0 <= value.item() < 1e-4

    # The object queries now predict an empty mask and another class.
    wrong_masks, wrong_classes = mask_logits.clone(), class_logits.clone()
    for image, query, label in object_queries:
        wrong_masks[image, query] = -20.0
        wrong_classes[image, query] = 0.0
        wrong_classes[image, query, (label + 1) % num_classes] = 20.0
    wrong = criterion([{"mask_logits": wrong_masks, "class_logits": wrong_classes}], targets)
    assert wrong["loss_mask_0"] > 5 and wrong["loss_dice_0"] > 0.9 and wrong["loss_class_0"] > 5


def test_image_without_targets_backpropagates():
    torch.manual_seed(0)
    num_classes = 4
    mask_logits = torch.randn(2, 5, 8, 8, requires_grad=True)
    class_logits = torch.randn(2, 5, num_classes + 1, requires_grad=True)
    targets = [
        {"masks": torch.rand(3, 32, 32) > 0.5, "labels": torch.tensor([0, 3, 3])},
        {"masks": torch.zeros(0, 32, 32, dtype=torch.bool), "labels": torch.zeros(0).long()},
    ]
    criterion = MaskClassificationLoss(num_classes, num_points=128)
    losses = criterion([{"mask_logits": mask_logits, "class_logits": class_logits}], targets)
    losses["loss"].backward()

    assert torch.isfinite(losses["loss"])
    assert mask_logits.grad[0].abs().sum() > 0
    assert mask_logits.grad[1].abs().sum() == 0
    # The empty image's queries are all pushed towards no-object.
    assert (class_logits.grad[1, :, num_classes] < 0).all()


def test_batch_without_any_targets():
    torch.manual_seed(0)
    num_classes = 4
    mask_logits = torch.randn(2, 5, 8, 8, requires_grad=True)
    class_logits = torch.randn(2, 5, num_classes + 1, requires_grad=True)
    empty = {"masks": torch.zeros(0, 32, 32, dtype=torch.bool), "labels": torch.zeros(0).long()}
    criterion = MaskClassificationLoss(num_classes, num_points=128)
    losses = criterion([{"mask_logits": mask_logits, "class_logits": class_logits}], [empty, empty])
    losses["loss"].backward()

    assert losses["loss_mask_0"].item() == losses["loss_dice_0"].item() == 0.0
    # Every query is no-object with the same weight, so the weighted mean is the plain mean.
    expected_class = -torch.log_softmax(class_logits, -1)[..., num_classes].mean()
    torch.testing.assert_close(losses["loss_class_0"], expected_class)
    torch.testing.assert_close(losses["loss"], 2 * expected_class)
    assert mask_logits.grad is not None and mask_logits.grad.abs().sum() == 0


def test_output_keys_and_deep_supervision_sums_depths():
    torch.manual_seed(0)
    num_classes = 4
    criterion = MaskClassificationLoss(num_classes, num_points=64)
    # Full and empty targets with constant logits: the losses do not depend on the points.
    # The images' targets also differ in size, which the loss allows.
    targets = [
        {
            "masks": torch.stack([full_mask(16), ~full_mask(16)]),
            "labels": torch.tensor([1, 2]),
        },
        {"masks": full_mask(12)[None], "labels": torch.tensor([0])},
    ]
    prediction_a = {
        "mask_logits": constant_logits(torch.randn(2, 6) * 3),
        "class_logits": torch.randn(2, 6, num_classes + 1),
    }
    prediction_b = {
        "mask_logits": constant_logits(torch.randn(2, 6) * 3),
        "class_logits": torch.randn(2, 6, num_classes + 1),
    }

    single_a = criterion([prediction_a], targets)
    single_b = criterion([prediction_b], targets)
    stacked = criterion([prediction_a, prediction_b, prediction_a], targets)

    expected_keys = {
        f"loss_{term}_{depth}" for term in ("mask", "dice", "class") for depth in range(3)
    }
    assert set(stacked) == expected_keys | {"loss"}
    for depth, single in enumerate([single_a, single_b, single_a]):
        for term in ("mask", "dice", "class"):
            torch.testing.assert_close(stacked[f"loss_{term}_{depth}"], single[f"loss_{term}_0"])
    torch.testing.assert_close(stacked["loss"], 2 * single_a["loss"] + single_b["loss"])
    weighted = sum(
        5 * stacked[f"loss_mask_{d}"]
        + 5 * stacked[f"loss_dice_{d}"]
        + 2 * stacked[f"loss_class_{d}"]
        for d in range(3)
    )
    torch.testing.assert_close(stacked["loss"], weighted)


def test_half_precision_logits_are_computed_in_float32():
    torch.manual_seed(0)
    num_classes = 4
    prediction = {
        "mask_logits": torch.randn(2, 5, 8, 8).bfloat16(),
        "class_logits": torch.randn(2, 5, num_classes + 1).bfloat16(),
    }
    targets = [
        {"masks": torch.rand(2, 32, 32) > 0.5, "labels": torch.tensor([0, 1])},
        {"masks": torch.rand(1, 32, 32) > 0.5, "labels": torch.tensor([2])},
    ]
    criterion = MaskClassificationLoss(num_classes, num_points=128)

    torch.manual_seed(1)
    from_bf16 = criterion([prediction], targets)
    torch.manual_seed(1)
    from_fp32 = criterion([{key: value.float() for key, value in prediction.items()}], targets)

    assert all(value.dtype == torch.float32 for value in from_bf16.values())
    for key, value in from_fp32.items():
        torch.testing.assert_close(from_bf16[key], value, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("class_dim", "labels", "num_targets", "message"),
    [
        (4, torch.tensor([0]), 2, "num_classes \\+ 1 = 5"),
        (5, torch.tensor([0]), 3, "batch size 2 but 3 targets"),
        (5, torch.tensor([4]), 2, "targets\\[0\\]\\['labels'\\]: values must lie in \\[0, 4\\)"),
    ],
)
def test_bad_input_raises_clear_error(class_dim, labels, num_targets, message):
    prediction = {
        "mask_logits": torch.zeros(2, 3, 4, 4),
        "class_logits": torch.zeros(2, 3, class_dim),
    }
    targets = [{"masks": full_mask(16)[None], "labels": labels} for _ in range(num_targets)]
    with pytest.raises(ValueError, match=message):
        MaskClassificationLoss(num_classes=4)([prediction], targets)
