"""Turn one image's query predictions into semantic, instance and panoptic outputs.

All functions take the per-image model outputs already resized to the output resolution:
``mask_logits`` (K, H, W) and ``class_logits`` (K, C+1), where index C is "no object".
"""

import torch


def _check_shapes(mask_logits: torch.Tensor, class_logits: torch.Tensor) -> None:
    if mask_logits.dim() != 3:
        raise ValueError(f"mask_logits must be (K, H, W), got shape {tuple(mask_logits.shape)}")
    if class_logits.dim() != 2:
        raise ValueError(f"class_logits must be (K, C+1), got shape {tuple(class_logits.shape)}")
    if mask_logits.shape[0] != class_logits.shape[0]:
        raise ValueError(
            f"mask_logits has {mask_logits.shape[0]} queries but class_logits has "
            f"{class_logits.shape[0]}"
        )


def semantic_inference(mask_logits: torch.Tensor, class_logits: torch.Tensor) -> torch.Tensor:
    """Per-class scores (C, H, W): sum over queries of sigmoid(mask) x P(class).

    The class softmax runs over all C+1 logits; the no-object column is dropped afterwards.
    The label map is ``semantic_inference(...).argmax(0)``.
    """
    _check_shapes(mask_logits, class_logits)
    class_probs = class_logits.float().softmax(dim=-1)[:, :-1]
    mask_probs = mask_logits.float().sigmoid()
    return torch.einsum("kc,khw->chw", class_probs, mask_probs)


def instance_inference(
    mask_logits: torch.Tensor,
    class_logits: torch.Tensor,
    topk: int = 100,
    thing_classes: list[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Top-k (query, class) pairs as scored binary masks.

    Candidates are all query x class pairs (no-object excluded), restricted to ``thing_classes``
    when given, so a panoptic model never spends its budget on stuff. A mask is ``logit > 0``;
    its score is the class probability times the mean sigmoid inside the mask (0 if empty).
    Returns ``masks`` bool (M, H, W), ``scores`` float (M,) and ``labels`` int64 (M,), ordered by
    decreasing class probability.
    """
    _check_shapes(mask_logits, class_logits)
    num_classes = class_logits.shape[1] - 1
    class_probs = class_logits.float().softmax(dim=-1)[:, :-1]
    if thing_classes is not None:
        candidate_classes = torch.as_tensor(
            list(thing_classes), dtype=torch.int64, device=class_logits.device
        )
        if candidate_classes.numel() and (
            candidate_classes.min() < 0 or candidate_classes.max() >= num_classes
        ):
            raise ValueError(f"thing_classes must lie in [0, {num_classes}), got {thing_classes}")
        class_probs = class_probs[:, candidate_classes]
    else:
        candidate_classes = torch.arange(num_classes, device=class_logits.device)

    flat_probs = class_probs.flatten()
    top_probs, top_indices = flat_probs.topk(min(topk, flat_probs.numel()), sorted=True)
    query_indices = top_indices // class_probs.shape[1]
    labels = candidate_classes[top_indices % class_probs.shape[1]]

    top_mask_logits = mask_logits[query_indices].float()
    masks = top_mask_logits > 0
    mask_area = masks.flatten(1).sum(dim=1)
    sigmoid_sum = (top_mask_logits.sigmoid() * masks).flatten(1).sum(dim=1)
    mask_scores = sigmoid_sum / mask_area.clamp(min=1)
    return {"masks": masks, "scores": top_probs * mask_scores, "labels": labels}


def panoptic_segments(
    mask_probs: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, overlap_threshold: float
):
    """Mask2Former's assignment of pixels to the kept queries (mask_probs (Q, H, W), scores
    and classes (Q,)): each pixel to the query with the largest score x mask probability; a
    query's segment is the pixels it owns where its probability >= 0.5. Yields (index of the
    query, segment mask, class, score) for each query, in order, whose segment is not empty and
    whose owned area is at least `overlap_threshold` of its area at >= 0.5. The areas are
    counted for all queries at once: one read from the device."""
    owner = (scores[:, None, None] * mask_probs).argmax(dim=0)
    foreground = mask_probs >= 0.5
    owned_area = torch.bincount(owner.flatten(), minlength=len(scores))
    owner_foreground = foreground.gather(0, owner[None])[0]
    segment_area = torch.zeros_like(owned_area).scatter_add_(
        0, owner.flatten(), owner_foreground.flatten().long()
    )
    areas = torch.stack((owned_area, foreground.flatten(1).sum(1), segment_area), 1).tolist()
    for index, ((owned, in_mask, segment), category, score) in enumerate(
        zip(areas, classes.tolist(), scores.tolist())
    ):
        if owned == 0 or in_mask == 0 or segment == 0 or owned / in_mask < overlap_threshold:
            continue
        yield index, (owner == index) & foreground[index], category, score


def panoptic_inference(
    mask_logits: torch.Tensor,
    class_logits: torch.Tensor,
    is_thing: list[bool] | torch.Tensor,
    score_threshold: float = 0.8,
    overlap_threshold: float = 0.8,
) -> tuple[torch.Tensor, list[dict]]:
    """Non-overlapping panoptic segmentation, following Mask2Former's panoptic inference.

    Queries are kept when their most likely class is not no-object and its probability exceeds
    ``score_threshold``. Each pixel goes to the kept query with the largest score x sigmoid(mask).
    A query's segment is the pixels it owns where its sigmoid(mask) >= 0.5; it is dropped when it
    owns no pixel, when that segment is empty, or when (owned area) / (sigmoid >= 0.5 area) is
    below ``overlap_threshold``. Stuff segments of the same class merge into one (its score is the
    highest of the merged queries).

    Returns ``segmentation`` int32 (H, W) with 0 = void and segment ids from 1, and the segment
    dicts ``{"id", "category_id", "iscrowd", "isthing", "score"}``.
    """
    _check_shapes(mask_logits, class_logits)
    num_classes = class_logits.shape[1] - 1
    is_thing = torch.as_tensor(is_thing, dtype=torch.bool)
    if is_thing.shape != (num_classes,):
        raise ValueError(
            f"is_thing must have one entry per class ({num_classes}), got shape "
            f"{tuple(is_thing.shape)}"
        )

    scores, classes = class_logits.float().softmax(dim=-1).max(dim=-1)
    keep = (classes != num_classes) & (scores > score_threshold)
    scores, classes = scores[keep], classes[keep]
    mask_probs = mask_logits[keep].float().sigmoid()

    segmentation = torch.zeros(mask_logits.shape[-2:], dtype=torch.int32, device=mask_logits.device)
    segments: list[dict] = []
    if not keep.any():
        return segmentation, segments

    stuff_segment_by_class: dict[int, dict] = {}
    for _, segment_mask, category, score in panoptic_segments(
        mask_probs, scores, classes, overlap_threshold
    ):
        thing = bool(is_thing[category])
        if not thing and category in stuff_segment_by_class:
            merged = stuff_segment_by_class[category]
            segmentation.masked_fill_(segment_mask, merged["id"])
            merged["score"] = max(merged["score"], score)
            continue

        segment = {
            "id": len(segments) + 1,
            "category_id": category,
            "iscrowd": 0,
            "isthing": int(thing),
            "score": score,
        }
        segmentation.masked_fill_(segment_mask, segment["id"])
        segments.append(segment)
        if not thing:
            stuff_segment_by_class[category] = segment
    return segmentation, segments
