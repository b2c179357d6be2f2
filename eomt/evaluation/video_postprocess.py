"""Whole-video post-processing of VidEoMT's per-frame predictions.

VidEoMT carries its queries from frame to frame, so query k is one object over the whole video:
a video's result is made from the per-frame logits of each query, with no matching between
frames.

Video instance segmentation (YouTube-VIS, OVIS) follows the authors' `inference_video_vis` of
their online model: a query's class logits are averaged over the frames, then soft-maxed (the
no-object class dropped); the `topk` best (query, class) pairs of the video are its instances
(a query may appear with several classes), each with the query's mask in every frame (logit
> 0).
"""

from collections.abc import Callable

import torch
from torch import Tensor


def video_class_scores(class_logits: Tensor) -> Tensor:
    """Per-frame class logits (T, K, C+1) -> a query's class probabilities over the video
    (K, C): the softmax of its logits averaged over frames, without no-object."""
    return class_logits.float().mean(0).softmax(-1)[:, :-1]


def video_instance_inference(
    mask_logits: Tensor,
    class_logits: Tensor,
    topk: int,
    restore: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """A video's instances from its per-frame mask logits (T, K, h, w) and class logits
    (T, K, C+1): {"masks" (M, T, H, W) bool, "scores" (M,), "labels" (M,) contiguous,
    "queries" (M,) the query of each}, M = min(topk, K * C), best score first.

    `restore` maps one frame's mask logits of the chosen queries (M, h, w) to the video's size
    (M, H, W) before thresholding (default: they are already at that size)."""
    scores = video_class_scores(class_logits)
    num_classes = scores.shape[1]
    top_scores, flat = scores.flatten().topk(min(topk, scores.numel()))
    queries = flat // num_classes
    labels = flat % num_classes
    chosen = queries.to(mask_logits.device)
    frames = [
        (restore(frame[chosen].float()) if restore is not None else frame[chosen].float()) > 0
        for frame in mask_logits
    ]
    masks = torch.stack(frames, 1)
    return {"masks": masks, "scores": top_scores, "labels": labels, "queries": queries}
