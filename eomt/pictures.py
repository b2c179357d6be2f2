"""Overlay pictures of semantic and instance predictions, and of what single queries predict at
each query block; all drawn as panoptic segmentations by `eomt.visualize.draw_panoptic`."""

import numpy as np
import torch

from eomt.visualize import LEGEND_BACKGROUND, draw_panoptic, side_by_side

IGNORE_LABEL = 255


def semantic_segments(labels: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    """Label map (H, W) -> (segment map, segments): one stuff segment per class present."""
    labels = np.asarray(labels).astype(np.int64)
    seg = np.where(labels == IGNORE_LABEL, 0, labels + 1)
    present = [int(c) for c in np.unique(labels) if c != IGNORE_LABEL]
    return seg, [{"id": c + 1, "category_id": c, "isthing": 0} for c in present]


def instance_segments(
    masks: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, score_threshold: float
) -> tuple[np.ndarray, list[dict]]:
    """Instances above `score_threshold` -> (segment map, segments); where instances overlap,
    the higher score is drawn on top."""
    keep = (scores >= score_threshold).nonzero().flatten().tolist()
    keep.sort(key=lambda i: float(scores[i]))
    seg = np.zeros(tuple(masks.shape[-2:]), dtype=np.int64)
    segments = []
    for number, index in enumerate(keep, start=1):
        seg[masks[index].cpu().numpy().astype(bool)] = number
        segments.append({"id": number, "category_id": int(labels[index]), "isthing": 1})
    present = set(np.unique(seg).tolist())
    return seg, [s for s in segments if s["id"] in present]


def draw_semantic(image: np.ndarray, labels: np.ndarray, categories: list[dict]) -> np.ndarray:
    return draw_panoptic(image, *semantic_segments(labels), categories)


def draw_instances(
    image: np.ndarray, result: dict, categories: list[dict], score_threshold: float = 0.5
) -> np.ndarray:
    seg, segments = instance_segments(
        result["masks"], result["scores"], result["labels"], score_threshold
    )
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
