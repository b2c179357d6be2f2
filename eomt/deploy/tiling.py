"""Large images in overlapping tiles at full resolution (SAHI-style): where the tiles go, and how
their panoptic segments and instances become the image's.

Tiles of `tile` pixels overlap by at least `overlap`; each is predicted as an image of its own
(`eomt.deploy.predictor.Predictor` with `tile`, each task's `stitch`). Every pixel takes the
prediction of one tile, the one whose core holds it (the cores split each overlap in the
middle). Segments of neighbouring tiles that cover the same part of their overlap with one
class are one object (intersection over union above `MATCH_IOU` there), so a thing cut by a
tile border becomes one segment and the duplicates of the overlaps go; stuff of one class is
one segment, as in an untiled prediction. Instances are joined alike; semantic labels are
pasted from each pixel's core.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch

MATCH_IOU = 0.5  # two tiles' segments, or instances, within their overlap: the same object


@dataclass(frozen=True)
class Tile:
    y0: int  # the tile in the image, [y0, y1) x [x0, x1)
    x0: int
    y1: int
    x1: int
    core: tuple[int, int, int, int]  # the pixels it decides: (y0, x0, y1, x1) in the image


def overlap_pixels(overlap: int | float, tile: int) -> int:
    """An overlap in pixels: an int as it is, a float in [0, 1) as that fraction of the tile."""
    if isinstance(overlap, float):
        if not 0 <= overlap < 1:
            raise ValueError(f"an overlap given as a fraction must be in [0, 1), got {overlap:g}")
        overlap = round(overlap * tile)
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap {overlap} must be in 0..{tile - 1} pixels (tile {tile})")
    return overlap


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of the fewest tiles of `tile` pixels covering `length` with neighbours overlapping
    by at least `overlap`, spread evenly; one tile at 0 when the length fits in one."""
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap {overlap} must be in 0..{tile - 1} (tile {tile})")
    if length <= tile:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def _cores(starts: list[int], tile: int, length: int) -> list[tuple[int, int]]:
    """Per tile along an axis, the span it decides: neighbours split their overlap halfway."""
    ends = [min(start + tile, length) for start in starts]
    bounds = [0] + [(ends[i] + starts[i + 1]) // 2 for i in range(len(starts) - 1)] + [length]
    return list(zip(bounds[:-1], bounds[1:]))


def tile_grid(height: int, width: int, tile: int, overlap: int) -> list[Tile]:
    """The tiles of an image, row by row."""
    rows, cols = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    row_cores, col_cores = _cores(rows, tile, height), _cores(cols, tile, width)
    return [
        Tile(y, x, min(y + tile, height), min(x + tile, width), (cy0, cx0, cy1, cx1))
        for y, (cy0, cy1) in zip(rows, row_cores)
        for x, (cx0, cx1) in zip(cols, col_cores)
    ]


class _Groups:
    """Union-find over (tile, segment) pairs."""

    def __init__(self):
        self.parent: dict = {}

    def find(self, node):
        self.parent.setdefault(node, node)
        while self.parent[node] != node:
            self.parent[node] = self.parent[self.parent[node]]
            node = self.parent[node]
        return node

    def union(self, a, b) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


def _overlap(a: Tile, b: Tile) -> tuple[int, int, int, int] | None:
    y0, x0, y1, x1 = max(a.y0, b.y0), max(a.x0, b.x0), min(a.y1, b.y1), min(a.x1, b.x1)
    return (y0, x0, y1, x1) if y0 < y1 and x0 < x1 else None


def _matching_ids(ids_a: np.ndarray, ids_b: np.ndarray) -> list[tuple[int, int]]:
    """Pairs of ids (both > 0) whose pixels in two equally shaped id maps overlap with an
    intersection over union above MATCH_IOU."""
    a, b = ids_a.ravel().astype(np.int64), ids_b.ravel().astype(np.int64)
    area_a, area_b = np.bincount(a), np.bincount(b)
    base = int(b.max(initial=0)) + 1
    found = []
    for code, inter in zip(*np.unique(a * base + b, return_counts=True)):
        i, j = divmod(int(code), base)
        if i and j and inter / (area_a[i] + area_b[j] - inter) > MATCH_IOU:
            found.append((i, j))
    return found


def stitch_panoptic(
    tiles: list[Tile], results: list[tuple[torch.Tensor, list[dict]]], height: int, width: int
) -> tuple[torch.Tensor, list[dict]]:
    """Per-tile panoptic results -> the image's: (H, W) int32 segment ids (0: none) and the
    segments, renumbered from 1, each with the class keys of its tile segments, its `area`
    and the highest `score` of the tile segments it joins.

    `results[i]`: tile i's segmentation (its own height and width, ids 0 or its segments') and
    segments ({"id", "label", "isthing", "score", ...}).
    """
    groups = _Groups()
    info = {}
    for t, (_, segments) in enumerate(results):
        for segment in segments:
            info[(t, segment["id"])] = segment
            groups.find((t, segment["id"]))
    stuff_owner: dict[int, tuple] = {}
    for node, segment in info.items():
        if not segment["isthing"]:
            groups.union(node, stuff_owner.setdefault(segment["label"], node))
    maps = [seg.cpu().numpy() for seg, _ in results]
    for a in range(len(tiles)):
        for b in range(a + 1, len(tiles)):
            region = _overlap(tiles[a], tiles[b])
            if region is None:
                continue
            y0, x0, y1, x1 = region
            ids_a = maps[a][
                y0 - tiles[a].y0 : y1 - tiles[a].y0, x0 - tiles[a].x0 : x1 - tiles[a].x0
            ]
            ids_b = maps[b][
                y0 - tiles[b].y0 : y1 - tiles[b].y0, x0 - tiles[b].x0 : x1 - tiles[b].x0
            ]
            for i, j in _matching_ids(ids_a, ids_b):
                if info[(a, i)]["label"] == info[(b, j)]["label"]:
                    groups.union((a, i), (b, j))
    roots = sorted({groups.find(node) for node in info})
    number = {root: k + 1 for k, root in enumerate(roots)}
    canvas = np.zeros((height, width), dtype=np.int32)
    for t, tile in enumerate(tiles):
        cy0, cx0, cy1, cx1 = tile.core
        core = maps[t][cy0 - tile.y0 : cy1 - tile.y0, cx0 - tile.x0 : cx1 - tile.x0]
        lookup = np.zeros(int(core.max(initial=0)) + 1, dtype=np.int32)
        for (owner, sid), _ in info.items():
            if owner == t and sid < len(lookup):
                lookup[sid] = number[groups.find((owner, sid))]
        canvas[cy0:cy1, cx0:cx1] = lookup[core]
    areas = np.bincount(canvas.ravel(), minlength=len(roots) + 1)
    merged: dict[int, dict] = {}
    for node, segment in info.items():
        k = number[groups.find(node)]
        best = merged.get(k)
        if best is None or segment["score"] > best["score"]:
            merged[k] = {**segment, "id": k}
    # Segments that no core kept (seen only in overlaps another tile decided) are dropped.
    kept = [k for k in sorted(merged) if areas[k] > 0]
    renumber = np.zeros(len(roots) + 1, dtype=np.int32)
    renumber[kept] = np.arange(1, len(kept) + 1)
    segments = [{**merged[k], "id": int(renumber[k]), "area": int(areas[k])} for k in kept]
    return torch.from_numpy(renumber[canvas]), segments


def paste_cores(tiles: list[Tile], maps, height: int, width: int) -> torch.Tensor:
    """Per-tile maps (e.g. semantic labels, each its tile's height and width; any iterable,
    consumed one tile at a time) -> the image's: each pixel from the tile whose core holds it."""
    canvas = None
    for tile, tile_map in zip(tiles, maps):
        if canvas is None:
            canvas = tile_map.new_zeros((height, width))
        cy0, cx0, cy1, cx1 = tile.core
        canvas[cy0:cy1, cx0:cx1] = tile_map[
            cy0 - tile.y0 : cy1 - tile.y0, cx0 - tile.x0 : cx1 - tile.x0
        ]
    return canvas


@dataclass
class Instance:
    """One instance of a tiled image: its mask within its box, both in image coordinates."""

    box: tuple[int, int, int, int]  # (y0, x0, y1, x1)
    mask: torch.Tensor  # bool (y1 - y0, x1 - x0)
    score: float
    label: int


def _instances_of_tile(tile: Tile, masks: torch.Tensor, scores, labels) -> list[Instance]:
    found = []
    for mask, score, label in zip(masks, scores.tolist(), labels.tolist()):
        rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
        if len(rows) == 0:
            continue
        y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        box = (tile.y0 + y0, tile.x0 + x0, tile.y0 + y1, tile.x0 + x1)
        found.append(Instance(box, mask[y0:y1, x0:x1].clone(), score, label))
    return found


def _meet(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    """Whether two boxes (y0, x0, y1, x1) share a pixel."""
    return max(a[0], b[0]) < min(a[2], b[2]) and max(a[1], b[1]) < min(a[3], b[3])


def _pixels_in(instance: Instance, region: tuple[int, int, int, int]) -> torch.Tensor:
    """The instance's mask over `region` (zeros where it has none)."""
    y0, x0, y1, x1 = region
    out = torch.zeros(y1 - y0, x1 - x0, dtype=torch.bool)
    by0, bx0, by1, bx1 = instance.box
    iy0, ix0, iy1, ix1 = max(y0, by0), max(x0, bx0), min(y1, by1), min(x1, bx1)
    if iy0 < iy1 and ix0 < ix1:
        out[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = instance.mask[
            iy0 - by0 : iy1 - by0, ix0 - bx0 : ix1 - bx0
        ]
    return out


def stitch_instances(
    tiles: list[Tile], results: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], topk: int
) -> list[Instance]:
    """Per-tile instances -> the image's, best first, at most `topk`: instances of one class in
    neighbouring tiles that cover the same part of their overlap (IoU above MATCH_IOU there)
    are one, their masks joined and the best score kept, so that an object cut by a tile
    border is whole and the duplicates of the overlaps go.

    `results`: per tile its masks (N, its height, its width) bool, scores (N,), labels (N,);
    any iterable, consumed one tile at a time, so that only the masks within their boxes are
    kept.
    """
    per_tile = [_instances_of_tile(tile, *result) for tile, result in zip(tiles, results)]
    groups = _Groups()
    for a in range(len(tiles)):
        for b in range(a + 1, len(tiles)):
            region = _overlap(tiles[a], tiles[b])
            if region is None:
                continue
            for i, first in enumerate(per_tile[a]):
                if not _meet(first.box, region):
                    continue
                for j, second in enumerate(per_tile[b]):
                    if first.label != second.label or not _meet(first.box, second.box):
                        continue
                    p, q = _pixels_in(first, region), _pixels_in(second, region)
                    union = int((p | q).sum())
                    if union and int((p & q).sum()) / union > MATCH_IOU:
                        groups.union((a, i), (b, j))
    members: dict[tuple, list[Instance]] = {}
    for t, instances in enumerate(per_tile):
        for i, instance in enumerate(instances):
            members.setdefault(groups.find((t, i)), []).append(instance)
    stitched = []
    for group in members.values():
        y0, x0 = min(m.box[0] for m in group), min(m.box[1] for m in group)
        y1, x1 = max(m.box[2] for m in group), max(m.box[3] for m in group)
        mask = torch.zeros(y1 - y0, x1 - x0, dtype=torch.bool)
        for member in group:
            mask |= _pixels_in(member, (y0, x0, y1, x1))
        best = max(group, key=lambda m: m.score)
        stitched.append(Instance((y0, x0, y1, x1), mask, best.score, best.label))
    stitched.sort(key=lambda instance: -instance.score)
    return stitched[:topk]
