"""From images to mask and class logits at each image's own size: the input geometry that
evaluation, the predictor, the benchmark and the exporter share.

Panoptic and instance inference resize an image's long side to the input size and zero-pad it;
the predicted mask logits are cropped back to the image and resized to its original size before
post-processing. Semantic inference (a model trained for the semantic task) resizes the short
side to the input size and predicts overlapping square windows along the long side, averaging
the per-pixel class scores where windows overlap.
"""

import math
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from eomt.evaluation.postprocess import semantic_inference


def resize_and_pad(image: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, tuple]:
    """(3, H, W) -> (3, *size): long side scaled to fit, zero padding bottom and right.

    Returns the padded image and the (height, width) of the image inside it.
    """
    height, width = image.shape[-2:]
    scale = min(size[0] / height, size[1] / width)
    inner = (round(height * scale), round(width * scale))
    padded = F.pad(_resize(image, inner), (0, size[1] - inner[1], 0, size[0] - inner[0]))
    return padded, inner


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(image[None], size, mode="bilinear", antialias=True)[0]


def restore_logits(mask_logits: torch.Tensor, inner: tuple, size: tuple, original: tuple):
    """Mask logits (K, h, w) of a padded input of `size` -> (K, *original)."""
    full = F.interpolate(mask_logits[None], size, mode="bilinear")[0]
    return F.interpolate(full[None, :, : inner[0], : inner[1]], original, mode="bilinear")[0]


def window_starts(length: int, window: int) -> list[int]:
    """Starts of the fewest windows of `window` pixels covering `length`, evenly overlapping."""
    count = math.ceil(length / window)
    overlap = count * window - length
    step = window - (overlap / (count - 1) if count > 1 else 0)
    return [int(i * step) for i in range(count)]


def amp_on(device: torch.device, amp: str) -> str:
    """The mixed precision that runs on `device`: `amp` ("bf16", "fp16") on CUDA, else "none"."""
    return amp if device.type == "cuda" else "none"


def autocast_for(device: torch.device, amp: str):
    """The autocast context of `amp_on(device, amp)`."""
    amp = amp_on(device, amp)
    if amp == "none":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """Float image (3, H, W) in [0, 1] -> uint8 (H, W, 3)."""
    return (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def _predictions(model, batch: torch.Tensor, amp: str, every_depth: bool) -> list[dict]:
    """The model's predictions of `batch`: every supervised depth's, or the final one only."""
    with autocast_for(batch.device, amp):
        predictions = model(batch)
    return predictions if every_depth else predictions[-1:]


@torch.no_grad()
def predict_logits(
    model, images: list[torch.Tensor], input_size, amp: str = "none", every_depth: bool = False
):
    """Per depth, per image: mask logits (K, H, W) at the image's own size and class logits
    (K, C+1). The depths are every prediction the model returns (`every_depth`: with masked
    attention, one before each query block, then the final) or the final one only."""
    device = next(model.parameters()).device
    size = tuple(input_size)
    padded, inners = zip(*(resize_and_pad(image.to(device), size) for image in images))
    by_depth = []
    for prediction in _predictions(model, torch.stack(padded), amp, every_depth):
        outputs = []
        for i, image in enumerate(images):
            mask_logits = prediction["mask_logits"][i].float()
            mask_logits = restore_logits(mask_logits, inners[i], size, tuple(image.shape[-2:]))
            outputs.append((mask_logits, prediction["class_logits"][i].float()))
        by_depth.append(outputs)
    return by_depth


@torch.no_grad()
def predict_video_logits(model, video: torch.Tensor, input_size, amp: str = "none"):
    """A video model's (VidEoMT's `step`) per-frame logits of one video (T, 3, H, W), float in
    [0, 1] or uint8, frame after frame with the queries carried over (constant memory): mask
    logits (T, K, h, w) of the resized and padded input, on the CPU, class logits (T, K, C+1),
    and `restore`, which maps one frame's mask logits (M, h, w) to the video's size (M, H, W)
    as `predict_logits` does for an image."""
    device = next(model.parameters()).device
    size = tuple(input_size)
    original = tuple(video.shape[-2:])
    inner = None
    queries = None
    masks, classes = [], []
    for frame in video:
        frame = frame.to(device)
        if frame.dtype == torch.uint8:
            frame = frame.float() / 255
        padded, inner = resize_and_pad(frame, size)
        with autocast_for(device, amp):
            prediction, queries = model.step(padded[None], queries)
        masks.append(prediction["mask_logits"][0].float().cpu())
        classes.append(prediction["class_logits"][0].float())
    mask_logits, class_logits = torch.stack(masks), torch.stack(classes)

    def restore(frame_logits: torch.Tensor) -> torch.Tensor:
        return restore_logits(frame_logits, inner, size, original)

    return mask_logits, class_logits, restore


@torch.no_grad()
def predict_semantic_windows(
    model, images: list[torch.Tensor], window: int, amp: str = "none", every_depth: bool = False
):
    """Per depth (as `predict_logits`), per image: per-pixel class scores (C, H, W) from square
    windows of `window` pixels."""
    device = next(model.parameters()).device
    crops, origins = [], []
    for index, image in enumerate(images):
        height, width = image.shape[-2:]
        scale = window / min(height, width)
        resized = _resize(image.to(device), (round(height * scale), round(width * scale)))
        long_dim = 1 if resized.shape[1] > resized.shape[2] else 2
        for start in window_starts(resized.shape[long_dim], window):
            crops.append(resized.narrow(long_dim, start, window))
            origins.append((index, long_dim, start, resized.shape[1:]))
    by_depth = []
    for prediction in _predictions(model, torch.stack(crops), amp, every_depth):
        sums: dict[int, torch.Tensor] = {}
        counts: dict[int, torch.Tensor] = {}
        for crop, (index, long_dim, start, size) in enumerate(origins):
            scores = _window_scores(prediction, crop, window)
            if index not in sums:
                sums[index] = scores.new_zeros(scores.shape[0], *size)
                counts[index] = scores.new_zeros(1, *size)
            sums[index].narrow(long_dim, start, window).add_(scores)
            counts[index].narrow(long_dim, start, window).add_(1)
        by_depth.append(
            [
                F.interpolate(
                    (sums[i] / counts[i])[None], tuple(image.shape[-2:]), mode="bilinear"
                )[0]
                for i, image in enumerate(images)
            ]
        )
    return by_depth


def _window_scores(prediction: dict, crop: int, window: int) -> torch.Tensor:
    """Per-pixel class scores (C, window, window) of one window: EoMT's mask-classification
    scores, or a dense head's per-pixel softmax."""
    if "semantic_logits" in prediction:
        logits = prediction["semantic_logits"][crop : crop + 1].float()
        return F.interpolate(logits, (window, window), mode="bilinear")[0].softmax(0)
    mask_logits = F.interpolate(
        prediction["mask_logits"][crop : crop + 1].float(), (window, window), mode="bilinear"
    )[0]
    return semantic_inference(mask_logits, prediction["class_logits"][crop].float())
