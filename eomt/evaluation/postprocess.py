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

    owner = (scores[:, None, None] * mask_probs).argmax(dim=0)
    stuff_segment_by_class: dict[int, dict] = {}
    for query in range(len(classes)):
        category = int(classes[query])
        owned = owner == query
        foreground = mask_probs[query] >= 0.5
        segment_mask = owned & foreground
        owned_area = int(owned.sum())
        foreground_area = int(foreground.sum())
        if owned_area == 0 or foreground_area == 0 or not segment_mask.any():
            continue
        if owned_area / foreground_area < overlap_threshold:
            continue

        score = float(scores[query])
        thing = bool(is_thing[category])
        if not thing and category in stuff_segment_by_class:
            merged = stuff_segment_by_class[category]
            segmentation[segment_mask] = merged["id"]
            merged["score"] = max(merged["score"], score)
            continue

        segment = {
            "id": len(segments) + 1,
            "category_id": category,
            "iscrowd": 0,
            "isthing": int(thing),
            "score": score,
        }
        segmentation[segment_mask] = segment["id"]
        segments.append(segment)
        if not thing:
            stuff_segment_by_class[category] = segment
    return segmentation, segments
