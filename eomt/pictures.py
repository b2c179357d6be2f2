"""Overlay pictures: panoptic segmentations with class colours, outlines, names and a legend,
and semantic and instance predictions and single queries' masks drawn as such."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:  # torch only in annotations: importing this module stays cheap
    import torch

FONT_SIZE = 13
LEGEND_BACKGROUND = (32, 32, 32)
TEXT_COLOR = (255, 255, 255)
TEXT_STROKE = (0, 0, 0)
IGNORE_LABEL = 255


def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=FONT_SIZE)


def _check_rgb(image: np.ndarray, what: str) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{what} must be a uint8 (H, W, 3) array, got {image.dtype} {image.shape}")


def upscale_factor(height: int, width: int) -> int:
    """Nearest-neighbour magnification that leaves room for readable class names."""
    longest = max(height, width)
    if longest <= 128:
        return 3
    if longest <= 256:
        return 2
    return 1


def _segment_color(segment: dict, categories: list[dict]) -> np.ndarray:
    """Category colour for stuff; things get a per-instance jitter so neighbours differ."""
    color = np.array(categories[segment["category_id"]]["color"], dtype=np.int64)
    if segment["isthing"]:
        jitter = np.random.default_rng(segment["id"]).integers(-48, 49, size=3)
        color = np.clip(color + jitter, 0, 255)
    return color


def _segment_boundaries(seg: np.ndarray) -> np.ndarray:
    """Pixels of a segment with a 4-neighbour in another segment (void borders included)."""
    different = np.zeros(seg.shape, dtype=bool)
    vertical = seg[1:, :] != seg[:-1, :]
    horizontal = seg[:, 1:] != seg[:, :-1]
    different[1:, :] |= vertical
    different[:-1, :] |= vertical
    different[:, 1:] |= horizontal
    different[:, :-1] |= horizontal
    return different & (seg != 0)


def _label_position(segment_mask: np.ndarray) -> tuple[int, int]:
    """(x, y) of the segment pixel closest to the segment's centroid."""
    ys, xs = np.nonzero(segment_mask)
    nearest = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)
    return int(xs[nearest]), int(ys[nearest])


def _legend(width: int, entries: list[tuple[str, tuple[int, int, int]]]) -> np.ndarray:
    """Strip of colour swatches and class names, wrapped onto as many rows as needed."""
    font = _font()
    line_height, swatch, padding = FONT_SIZE + 8, FONT_SIZE, 4
    positions, x, y = [], padding, padding
    for name, _ in entries:
        entry_width = swatch + 4 + int(font.getlength(name)) + 2 * padding
        if x > padding and x + entry_width > width:
            x, y = padding, y + line_height
        positions.append((x, y))
        x += entry_width
    strip = Image.new("RGB", (width, y + line_height + padding), LEGEND_BACKGROUND)
    draw = ImageDraw.Draw(strip)
    for (name, color), (x, y) in zip(entries, positions):
        draw.rectangle([x, y + 2, x + swatch, y + 2 + swatch], fill=color, outline=TEXT_COLOR)
        draw.text((x + swatch + 4, y + 2), name, fill=TEXT_COLOR, font=font)
    return np.asarray(strip)


def draw_panoptic(
    image: np.ndarray,
    seg: np.ndarray,
    segments: list[dict],
    categories: list[dict],
    alpha: float = 0.5,
) -> np.ndarray:
    """Colour each segment over the image, outline it, name it, and add a legend strip below.

    Small images are first magnified ``upscale_factor`` times (nearest), so the result is
    (s*H + legend height, s*W, 3) uint8. Void (id 0) pixels keep the image colour.
    """
    _check_rgb(image, "image")
    seg = np.asarray(seg).astype(np.int64)
    if seg.shape != image.shape[:2]:
        raise ValueError(f"seg shape {seg.shape} != image size {image.shape[:2]}")
    scale = upscale_factor(*seg.shape)
    image = image.repeat(scale, axis=0).repeat(scale, axis=1)
    seg = seg.repeat(scale, axis=0).repeat(scale, axis=1)

    colors = np.zeros((int(seg.max()) + 1, 3), dtype=np.float64)
    for segment in segments:
        if segment["id"] < len(colors):
            colors[segment["id"]] = _segment_color(segment, categories)
    overlay = image.astype(np.float64)
    labelled = seg != 0
    overlay[labelled] = (1 - alpha) * overlay[labelled] + alpha * colors[seg[labelled]]

    # Dark outlines on light colours and light outlines on dark ones, for contrast.
    luminance = colors @ np.array([0.299, 0.587, 0.114])
    outline_colors = np.where(luminance[:, None] > 150, 0.0, 255.0)
    boundaries = _segment_boundaries(seg)
    overlay[boundaries] = outline_colors[seg[boundaries]]

    canvas = Image.fromarray(overlay.round().astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    font = _font()
    for segment in segments:
        segment_mask = seg == segment["id"]
        if not segment_mask.any():
            continue
        draw.text(
            _label_position(segment_mask),
            categories[segment["category_id"]]["name"],
            fill=TEXT_COLOR,
            font=font,
            anchor="mm",
            stroke_width=2,
            stroke_fill=TEXT_STROKE,
        )

    present = sorted({segment["category_id"] for segment in segments})
    legend = _legend(
        canvas.width,
        [(categories[label]["name"], tuple(categories[label]["color"])) for label in present],
    )
    return np.concatenate([np.asarray(canvas), legend], axis=0)


def side_by_side(images: list[np.ndarray], titles: list[str], gap: int = 4) -> np.ndarray:
    """Images in a row with a title above each; shorter ones are padded at the bottom."""
    if not images or len(images) != len(titles):
        raise ValueError(f"need as many titles as images, got {len(images)} and {len(titles)}")
    for index, image in enumerate(images):
        _check_rgb(image, f"images[{index}]")
    title_height = FONT_SIZE + 8
    height = title_height + max(image.shape[0] for image in images)
    width = sum(image.shape[1] for image in images) + gap * (len(images) - 1)
    canvas = Image.new("RGB", (width, height), LEGEND_BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font()
    x = 0
    for image, title in zip(images, titles):
        canvas.paste(Image.fromarray(image), (x, title_height))
        center = (x + image.shape[1] // 2, title_height // 2)
        draw.text(center, title, fill=TEXT_COLOR, font=font, anchor="mm")
        x += image.shape[1] + gap
    return np.asarray(canvas)


def semantic_segments(labels: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    """Label map (H, W) -> (segment map, segments): one stuff segment per class present."""
    labels = np.asarray(labels).astype(np.int64)
    seg = np.where(labels == IGNORE_LABEL, 0, labels + 1)
    present = [int(c) for c in np.unique(labels) if c != IGNORE_LABEL]
    return seg, [{"id": c + 1, "category_id": c, "isthing": 0} for c in present]


def instance_segments(
    result: dict, size: tuple[int, int], score_threshold: float
) -> tuple[np.ndarray, list[dict]]:
    """Instances above `score_threshold` -> (segment map of `size`, segments); where instances
    overlap, the higher score is drawn on top. `result["masks"]` are the image's (M, H, W) or,
    with `result["boxes"]` (x0, y0, x1, y1) as a tiled prediction gives them, each within its
    box."""
    scores, boxes = result["scores"], result.get("boxes")
    keep = (scores >= score_threshold).nonzero().flatten().tolist()
    keep.sort(key=lambda i: float(scores[i]))
    seg = np.zeros(size, dtype=np.int64)
    segments = []
    for number, index in enumerate(keep, start=1):
        mask = result["masks"][index].cpu().numpy().astype(bool)
        if boxes is None:
            seg[mask] = number
        else:
            x0, y0, x1, y1 = boxes[index].tolist()
            seg[y0:y1, x0:x1][mask] = number
        segments.append({"id": number, "category_id": int(result["labels"][index]), "isthing": 1})
    present = set(np.unique(seg).tolist())
    return seg, [s for s in segments if s["id"] in present]


def draw_semantic(image: np.ndarray, labels: np.ndarray, categories: list[dict]) -> np.ndarray:
    return draw_panoptic(image, *semantic_segments(labels), categories)


def draw_instances(
    image: np.ndarray, result: dict, categories: list[dict], score_threshold: float = 0.5
) -> np.ndarray:
    seg, segments = instance_segments(result, image.shape[:2], score_threshold)
    return draw_panoptic(image, seg, segments, categories)


def draw_query_masks(
    image: np.ndarray,
    mask_logits: torch.Tensor,
    class_logits: torch.Tensor,
    queries: list[int],
    block_names: list[str],
    categories: list[dict],
) -> np.ndarray:
    """A grid: one row per query, one column per prediction (before each query block, then the
    final one); each cell shows the query's mask (logit > 0) and its most likely class.

    mask_logits: (P, Q, H, W) at the image's size and class_logits (P, Q, C+1) of the
    queries whose indices are `queries`.
    """
    rows = []
    probs = class_logits.softmax(-1)
    for row, query in enumerate(queries):
        cells, titles = [], []
        for index, name in enumerate(block_names):
            score, label = probs[index, row, :-1].max(0)
            mask = (mask_logits[index, row] > 0).cpu().numpy()
            segments = [{"id": 1, "category_id": int(label), "isthing": 0}] if mask.any() else []
            cells.append(draw_panoptic(image, mask.astype(np.int64), segments, categories))
            titles.append(f"q{query} {name}: {categories[int(label)]['name']} {float(score):.2f}")
        rows.append(side_by_side(cells, titles))
    return stack_rows(rows)


def stack_rows(rows: list[np.ndarray], gap: int = 4) -> np.ndarray:
    """Pictures one above the other on the legend background, left-aligned."""
    width = max(row.shape[1] for row in rows)
    height = sum(row.shape[0] for row in rows) + gap * (len(rows) - 1)
    canvas = np.empty((height, width, 3), dtype=np.uint8)
    canvas[:] = LEGEND_BACKGROUND
    y = 0
    for row in rows:
        canvas[y : y + row.shape[0], : row.shape[1]] = row
        y += row.shape[0] + gap
    return canvas
