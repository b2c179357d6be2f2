"""Whole-video post-processing of VidEoMT's per-frame predictions.

VidEoMT carries its queries from frame to frame, so query k is one object over the whole video:
a video's result is made from the per-frame logits of each query, with no matching between
frames.

Video instance segmentation (YouTube-VIS, OVIS) follows the authors' `inference_video_vis` of
their online model: a query's class logits are averaged over the frames, then soft-maxed (the
no-object class dropped); the `topk` best (query, class) pairs of the video are its instances
(a query may appear with several classes), each with the query's mask in every frame (logit
> 0). Video panoptic (VIPSeg) and semantic (VSPW) segmentation follow their
`inference_video_vps` and `inference_video_vss` with the same class probabilities over the
video (see each function).

A video's frames are restored to its size (`restore`) one at a time: memory holds one frame's
masks at full size, not the video's.
"""

from collections.abc import Callable

import torch
from torch import Tensor


def video_class_scores(class_logits: Tensor) -> Tensor:
    """Per-frame class logits (T, K, C+1) -> a query's class probabilities over the video
    (K, C): the softmax of its logits averaged over frames, without no-object."""
    return class_logits.float().mean(0).softmax(-1)[:, :-1]


def top_tracks(
    class_probs: torch.Tensor, max_tracks: int, classes: list[int] | None = None
) -> dict[str, torch.Tensor]:
    """The `max_tracks` best (query, class) pairs by class probability (no-object left out,
    `classes` only when given), best first: {scores, labels, queries}, as the authors'
    `inference_video_vis` picks a video's tracks."""
    probs = class_probs[:, :-1]
    candidates = torch.arange(probs.shape[1], device=probs.device)
    if classes is not None:
        candidates = torch.as_tensor(classes, dtype=torch.int64, device=probs.device)
        probs = probs[:, candidates]
    scores, flat = probs.flatten().topk(min(max_tracks, probs.numel()), sorted=True)
    return {
        "scores": scores,
        "labels": candidates[flat % probs.shape[1]],
        "queries": flat // probs.shape[1],
    }


def video_instance_inference(
    mask_logits: Tensor,
    class_logits: Tensor,
    topk: int,
    restore: Callable[[Tensor], Tensor] | None = None,
    thing_classes: list[int] | None = None,
) -> dict[str, Tensor]:
    """A video's instances from its per-frame mask logits (T, K, h, w) and class logits
    (T, K, C+1): {"masks" (M, T, H, W) bool, "scores" (M,), "labels" (M,) contiguous,
    "queries" (M,) the query of each}, M = min(topk, K * C), best score first.

    `restore` maps one frame's mask logits of the chosen queries (M, h, w) to the video's size
    (M, H, W) before thresholding (default: they are already at that size). `thing_classes`:
    the classes instances may have (a panoptic dataset's things), default all."""
    tracks = top_tracks(class_logits.float().mean(0).softmax(-1), topk, thing_classes)
    top_scores, labels, queries = tracks["scores"], tracks["labels"], tracks["queries"]
    chosen = queries.to(mask_logits.device)
    frames = [
        (restore(frame[chosen].float()) if restore is not None else frame[chosen].float()) > 0
        for frame in mask_logits
    ]
    masks = torch.stack(frames, 1)
    return {"masks": masks, "scores": top_scores, "labels": labels, "queries": queries}


def _restored(frame: Tensor, restore) -> Tensor:
    return restore(frame.float()) if restore is not None else frame.float()


def video_panoptic_inference(
    mask_logits: Tensor,
    class_logits: Tensor,
    is_thing: list[bool],
    object_threshold: float = 0.8,
    overlap_threshold: float = 0.8,
    restore: Callable[[Tensor], Tensor] | None = None,
) -> dict:
    """A video's panoptic segmentation, the authors' `inference_video_vps`: queries whose
    best class over the video (logits averaged over frames, softmax) is an object with
    probability > `object_threshold`; each pixel of each frame to the query of the largest
    score x mask probability, kept where that mask is >= 0.5; a query whose pixels so kept over
    the whole video are less than `overlap_threshold` of its own mask's (>= 0.5) is dropped;
    the segments of one stuff class share an id.

    Returns {"segments" (T, H, W) int32 (0: no segment), "segments_info" [{id, label, isthing,
    score, query}]}. The frames are restored and thresholded one at a time (memory of one
    frame's masks), then painted once the video's areas are known."""
    num_classes = class_logits.shape[-1] - 1
    scores, labels = class_logits.float().mean(0).softmax(-1).max(-1)
    kept = ((labels != num_classes) & (scores > object_threshold)).nonzero().flatten()
    kept_scores, kept_labels = scores[kept], labels[kept]
    count = len(kept)
    owners = []  # per frame: the kept query owning each pixel, -1 for none
    mask_area = torch.zeros(count, dtype=torch.int64)  # pixels where the query is the argmax
    own_area = torch.zeros(count, dtype=torch.int64)  # where its mask is >= 0.5
    kept_area = torch.zeros(count, dtype=torch.int64)  # both
    for frame in mask_logits:
        if count == 0:  # nothing kept: the frame's size only
            size = _restored(frame[:1], restore).shape[-2:]
            owners.append(torch.full(size, -1, dtype=torch.int64))
            continue
        probs = _restored(frame[kept.to(frame.device)], restore).sigmoid()
        winner = (kept_scores.to(probs.device)[:, None, None] * probs).argmax(0)
        strong = probs >= 0.5
        owner = torch.where(strong.gather(0, winner[None])[0], winner, -1).cpu()
        mask_area += torch.bincount(winner.flatten().cpu(), minlength=count)
        own_area += strong.flatten(1).sum(1).cpu()
        kept_area += torch.bincount(owner[owner >= 0], minlength=count)
        owners.append(owner)
    segment_of = torch.zeros(count + 1, dtype=torch.int32)  # owner + 1 -> segment id
    info, stuff_segment = [], {}
    for k in range(count):
        if mask_area[k] == 0 or own_area[k] == 0 or kept_area[k] == 0:
            continue
        if mask_area[k] / own_area[k] < overlap_threshold:
            continue
        label = int(kept_labels[k])
        thing = bool(is_thing[label])
        if not thing and label in stuff_segment:
            segment_of[k + 1] = stuff_segment[label]
            continue
        segment_id = len(info) + 1
        if not thing:
            stuff_segment[label] = segment_id
        segment_of[k + 1] = segment_id
        info.append(
            {
                "id": segment_id,
                "label": label,
                "isthing": thing,
                "score": float(kept_scores[k]),
                "query": int(kept[k]),
            }
        )
    segments = torch.stack([segment_of[owner + 1] for owner in owners])
    return {"segments": segments, "segments_info": info}


def video_semantic_inference(
    mask_logits: Tensor, class_logits: Tensor, restore: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """A video's per-frame classes (T, H, W) int64, the authors' `inference_video_vss`: the
    queries' class probabilities over the video (`video_class_scores`) weighted by each frame's
    mask probabilities, the best class per pixel; one frame at a time."""
    scores = video_class_scores(class_logits)
    frames = []
    for frame in mask_logits:
        probs = _restored(frame, restore).sigmoid()
        frames.append(torch.einsum("kc,khw->chw", scores.to(probs.device), probs).argmax(0).cpu())
    return torch.stack(frames)
