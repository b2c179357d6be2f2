"""Panoptic quality (PQ, SQ, RQ) with the rules of the COCO panoptic API's ``pq_compute``.

The per-image statistics can be computed by a pool of worker processes: ``process`` hands an
image to the pool and returns, so that inference goes on while earlier images are scored.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections import Counter, deque
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from eomt import distributed
from eomt.evaluation.panoptic_io import (
    prediction_annotation,
    read_panoptic_png,
    write_panoptic_json,
    write_panoptic_png,
)
from eomt.evaluation.semantic import to_numpy

if TYPE_CHECKING:  # torch only in annotations: importing this module stays cheap
    import torch

PREDICTIONS_NAME = "predictions"  # output_dir/predictions.json and output_dir/predictions/*.png
FILES_PER_TASK = 8  # images read by one worker task: fewer round trips through the pool
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def masks_to_panoptic(
    masks: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    is_crowd: torch.Tensor | np.ndarray,
    is_thing: list[bool] | torch.Tensor | np.ndarray,
) -> tuple[np.ndarray, list[dict]]:
    """Ground-truth segment map (H, W) int32 (0 = void) and segment dicts from a target.

    Masks must not overlap. Empty masks are skipped. Crowd masks of one class become a single
    segment, as in COCO panoptic annotations, because pq_compute keeps one crowd region per class.
    """
    masks = to_numpy(masks).astype(bool)
    labels = to_numpy(labels).astype(np.int64)
    is_crowd = to_numpy(is_crowd).astype(bool)
    is_thing = to_numpy(is_thing).astype(bool)
    if masks.ndim != 3 or labels.shape != (len(masks),) or is_crowd.shape != (len(masks),):
        raise ValueError(
            f"expected masks (N, H, W) with labels and is_crowd (N,), got {masks.shape}, "
            f"{labels.shape} and {is_crowd.shape}"
        )
    if len(masks) and masks.sum(axis=0).max() > 1:
        raise ValueError("panoptic ground-truth masks overlap; each pixel needs one segment")

    segmentation = np.zeros(masks.shape[1:], dtype=np.int32)
    segments: list[dict] = []
    crowd_segment_by_class: dict[int, dict] = {}
    for mask, label, crowd in zip(masks, labels.tolist(), is_crowd.tolist()):
        if not mask.any():
            continue
        if crowd and label in crowd_segment_by_class:
            segmentation[mask] = crowd_segment_by_class[label]["id"]
            continue
        segment = {
            "id": len(segments) + 1,
            "category_id": label,
            "iscrowd": int(crowd),
            "isthing": int(is_thing[label]),
        }
        segmentation[mask] = segment["id"]
        segments.append(segment)
        if crowd:
            crowd_segment_by_class[label] = segment
    return segmentation, segments


class ImageStats(NamedTuple):
    """One image's share of the PQ sums.

    ``matches``: (category, IoU) of each true positive, in pq_compute's order, so that adding
    them up one by one gives its floating-point sums exactly. ``false_positives`` and
    ``false_negatives``: counts per category, (C,) int64.
    """

    matches: list[tuple[int, float]]
    false_positives: np.ndarray
    false_negatives: np.ndarray


def _segments_by_id(
    segments: list[dict], num_classes: int, what: str, keys: tuple[str, ...]
) -> dict[int, dict]:
    by_id: dict[int, dict] = {}
    for segment in segments:
        missing = [key for key in keys if key not in segment]
        if missing:
            raise ValueError(f"{what} segment {segment} lacks the key(s) {missing}")
        segment_id, category = segment["id"], segment["category_id"]
        if segment_id == 0:
            raise ValueError(f"{what} segment id 0 is reserved for void")
        if segment_id in by_id:
            raise ValueError(f"{what} segment id {segment_id} appears twice in the segment list")
        if not 0 <= category < num_classes:
            raise ValueError(
                f"{what} segment {segment_id} has category_id {category}, "
                f"expected a contiguous label in [0, {num_classes})"
            )
        by_id[segment_id] = segment
    return by_id


def _pair_counts(gt_seg: np.ndarray, pred_seg: np.ndarray) -> tuple[np.ndarray, ...]:
    """(gt ids, pred ids, pixel counts) of every (gt id, pred id) pair of two maps, void (0)
    included on both sides, in sorted (gt id, pred id) order like pq_compute's.

    Segment maps are runs of one pair along their rows, so the pixels are counted per run: the
    sort is of a few thousand runs, not of every pixel (and whatever the size of the ids).
    """
    gt_flat, pred_flat = gt_seg.ravel(), pred_seg.ravel()
    if gt_flat.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    run_ends = gt_flat[1:] != gt_flat[:-1]
    run_ends |= pred_flat[1:] != pred_flat[:-1]
    starts = np.concatenate(([0], np.flatnonzero(run_ends) + 1))
    lengths = np.diff(starts, append=gt_flat.size)
    gt_runs, pred_runs = gt_flat[starts].astype(np.int64), pred_flat[starts].astype(np.int64)
    offset = int(pred_runs.max()) + 1
    codes = gt_runs * offset + pred_runs
    pairs = np.unique(codes)  # a sort and a search: several times faster than return_inverse
    pair_of_run = np.searchsorted(pairs, codes)
    counts = np.bincount(pair_of_run, weights=lengths, minlength=len(pairs)).astype(np.int64)
    return *np.divmod(pairs, offset), counts


def pq_image_stats(
    pred_seg: np.ndarray,
    pred_segments: list[dict],
    gt_seg: np.ndarray,
    gt_segments: list[dict],
    num_classes: int,
    where: str = "image",
) -> ImageStats:
    """PQ statistics of one image, by the rules of pq_compute.

    A prediction and a non-crowd ground-truth segment of the same class match when IoU > 0.5,
    the union leaving out the prediction's pixels on void. Unmatched non-crowd ground truth is a
    FN. An unmatched prediction is a FP unless more than half of it lies on void plus the crowd
    region of its class (the last crowd segment listed for that class). As in pq_compute, a
    ground-truth segment's ``area`` is taken from its dict when given (COCO JSON files carry it),
    ground-truth ids missing from the segment list are skipped rather than treated as void, and
    listed ground truth that covers no pixel is a FN. Every predicted id in the map must be in
    the segment list and vice versa. ``where`` prefixes error messages.
    """
    if pred_seg.shape != gt_seg.shape:
        raise ValueError(
            f"{where}: predicted map shape {pred_seg.shape} != ground-truth shape {gt_seg.shape}"
        )
    pred_by_id = _segments_by_id(
        pred_segments, num_classes, f"{where}: predicted", ("id", "category_id")
    )
    gt_by_id = _segments_by_id(
        gt_segments, num_classes, f"{where}: ground-truth", ("id", "category_id", "iscrowd")
    )
    for name, segment_map in (("predicted", pred_seg), ("ground-truth", gt_seg)):
        if not np.issubdtype(segment_map.dtype, np.integer):
            raise ValueError(
                f"{where}: the {name} map must hold integer ids, not {segment_map.dtype}"
            )
        signed = np.issubdtype(segment_map.dtype, np.signedinteger)  # PNGs give uint32
        if signed and segment_map.size and segment_map.min() < 0:
            raise ValueError(f"{where}: the {name} map holds negative ids")

    gt_ids, pred_ids, counts = _pair_counts(gt_seg, pred_seg)
    intersection = dict(zip(zip(gt_ids.tolist(), pred_ids.tolist()), counts.tolist()))
    pred_area, gt_pixels = Counter(), Counter()
    for (gt_id, pred_id), count in intersection.items():
        pred_area[pred_id] += count
        gt_pixels[gt_id] += count

    unlisted = sorted(pred_area.keys() - pred_by_id.keys() - {0})
    if unlisted:
        raise ValueError(
            f"{where}: predicted map has segment ids {unlisted} that are missing from its "
            "segment list"
        )
    absent = sorted(pred_by_id.keys() - pred_area.keys())
    if absent:
        raise ValueError(
            f"{where}: predicted segment list has ids {absent} that cover no pixel of its map"
        )
    gt_area = {i: segment.get("area", gt_pixels[i]) for i, segment in gt_by_id.items()}

    matches, matched_gt, matched_pred = [], set(), set()
    for (gt_id, pred_id), overlap in intersection.items():
        gt, pred = gt_by_id.get(gt_id), pred_by_id.get(pred_id)
        if gt is None or pred is None or gt["iscrowd"] or gt["category_id"] != pred["category_id"]:
            continue
        pred_on_void = intersection.get((0, pred_id), 0)
        iou = overlap / (pred_area[pred_id] + gt_area[gt_id] - overlap - pred_on_void)
        if iou > 0.5:
            matches.append((gt["category_id"], iou))
            matched_gt.add(gt_id)
            matched_pred.add(pred_id)

    false_negatives = np.zeros(num_classes, dtype=np.int64)
    crowd_id_by_class = {}
    for gt_id, gt in gt_by_id.items():
        if gt_id in matched_gt:
            continue
        if gt["iscrowd"]:
            crowd_id_by_class[gt["category_id"]] = gt_id
            continue
        false_negatives[gt["category_id"]] += 1

    false_positives = np.zeros(num_classes, dtype=np.int64)
    for pred_id, pred in pred_by_id.items():
        if pred_id in matched_pred:
            continue
        ignored_area = intersection.get((0, pred_id), 0)
        crowd_id = crowd_id_by_class.get(pred["category_id"])
        if crowd_id is not None:
            ignored_area += intersection.get((crowd_id, pred_id), 0)
        if ignored_area / pred_area[pred_id] > 0.5:
            continue
        false_positives[pred["category_id"]] += 1
    return ImageStats(matches, false_positives, false_negatives)


def _arrays_job(pred_seg, pred_segments, gt_seg, gt_segments, num_classes, where, png_path):
    """Worker task: statistics of in-memory maps; also writes the prediction PNG if asked."""
    stats = pq_image_stats(pred_seg, pred_segments, gt_seg, gt_segments, num_classes, where)
    if png_path is not None:
        write_panoptic_png(png_path, pred_seg)
    return [stats]


def _keep_freed_memory() -> None:
    """Pool initializer: a worker keeps the memory it frees, for the next image.

    Each image allocates and frees some MB of maps and temporaries. By default glibc hands
    such blocks back to the system (munmap, heap trimming) and the next image's first writes
    to them page-fault, about 600 times per COCO-sized image (PQ of 200 images from files in
    one worker: 2.27 s with the faults, 1.77 s without). Served from the heap (up to 32 MB a
    block) and with the heap trimmed only above 256 MB free, a worker's memory stays at what
    its largest image needed. Linux with glibc only.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, 32 << 20)
        mallopt(M_TRIM_THRESHOLD, 256 << 20)


def _files_job(images: list[tuple], num_classes: int) -> list[ImageStats]:
    """Worker task: statistics of images stored as panoptic PNGs, each given as (predicted
    PNG, its segments, ground-truth PNG, its segments, where)."""
    stats = []
    for pred_png, pred_segments, gt_png, gt_segments, where in images:
        pred_seg, gt_seg = read_panoptic_png(pred_png), read_panoptic_png(gt_png)
        if pred_seg.shape != gt_seg.shape:
            raise ValueError(
                f"{where}: {pred_png} has size {pred_seg.shape} but {gt_png} has {gt_seg.shape}"
            )
        stats.append(
            pq_image_stats(pred_seg, pred_segments, gt_seg, gt_segments, num_classes, where)
        )
    return stats


def _compact(segment_map: np.ndarray) -> np.ndarray:
    """The map in the smallest integer type that holds its ids: less to send to a worker."""
    if segment_map.size == 0 or segment_map.min() < 0:
        return segment_map
    largest = int(segment_map.max())
    for dtype in (np.uint8, np.uint16, np.int32):
        if largest <= np.iinfo(dtype).max:
            return segment_map.astype(dtype, copy=False)
    return segment_map


def _sequential_mean(values: np.ndarray) -> float:
    """Mean of values added one by one in order, as pq_compute does, to agree to the last bit."""
    total = 0.0
    for value in values.tolist():
        total += value
    return total / len(values)


class PanopticEvaluator:
    """PQ / SQ / RQ identical to the COCO panoptic API (panopticapi ``pq_compute``).

    Per-image rules: see ``pq_image_stats``. Class scores: PQ = sum IoU / (TP + FP/2 + FN/2),
    SQ = sum IoU / TP, RQ = TP / (TP + FP/2 + FN/2); All / Things / Stuff average over the
    classes of the group with TP + FP + FN > 0 (N of them; 0 for a group with none, where
    pq_compute divides by zero). Results are in percent.

    ``workers`` processes (default min(8, CPU count); 0 = compute in this process) score the
    images while the caller goes on; at most 2 x workers tasks wait (an image each, or
    ``FILES_PER_TASK`` images from files), so memory stays flat.
    Results do not depend on the number of workers: images are added up in the order given.
    An error in an image surfaces at a later ``process`` call or at ``evaluate``. Worker tasks
    are top-level functions of picklable arguments, so every start method works; ``start_method``
    None takes multiprocessing's default (fork on Linux: instant, whereas a spawned worker first
    imports the eomt package, seconds). With ``output_dir`` the predictions are also written in
    the COCO panoptic result format: ``output_dir/predictions/<file stem>.png`` (by the workers)
    and ``output_dir/predictions.json`` (at ``evaluate``, by rank 0).
    """

    def __init__(
        self,
        categories: list[dict],
        workers: int | None = None,
        output_dir: str | Path | None = None,
        start_method: str | None = None,
    ):
        self.categories = categories
        self.num_classes = len(categories)
        self.is_thing = np.array([bool(category["isthing"]) for category in categories])
        self.workers = min(8, os.cpu_count() or 1) if workers is None else workers
        if self.workers < 0:
            raise ValueError(f"PanopticEvaluator: workers must be >= 0, got {self.workers}")
        self.start_method = start_method
        self.output_dir = None if output_dir is None else Path(output_dir)
        if self.output_dir is not None:
            (self.output_dir / PREDICTIONS_NAME).mkdir(parents=True, exist_ok=True)
        self._pool: ProcessPoolExecutor | None = None
        self._pending: deque[Future] = deque()
        self._files: list[tuple] = []  # images of process_files not yet handed to a worker
        self.reset()

    def reset(self) -> None:
        self._close_pool()
        self.iou_sum = np.zeros(self.num_classes, dtype=np.float64)
        self.true_positives = np.zeros(self.num_classes, dtype=np.int64)
        self.false_positives = np.zeros(self.num_classes, dtype=np.int64)
        self.false_negatives = np.zeros(self.num_classes, dtype=np.int64)
        self.image_ids: list[int | str] = []
        self.annotations: list[dict] = []

    def process(
        self,
        pred_seg: np.ndarray | torch.Tensor,
        pred_segments: list[dict],
        gt_seg: np.ndarray | torch.Tensor,
        gt_segments: list[dict],
        image_id: int | str | None = None,
        file_name: str | None = None,
    ) -> None:
        """Add one image: segment-id maps (0 = void) with their segment dicts (contiguous labels).

        ``image_id`` lets ``evaluate`` refuse an image counted twice (e.g. on two ranks); it and
        ``file_name`` (the image's, e.g. ``000139.jpg``) are required with ``output_dir``.
        """
        png_path = None
        if self.output_dir is not None:
            if image_id is None or file_name is None:
                raise ValueError("PanopticEvaluator with output_dir needs image_id and file_name")
            png_name = Path(file_name).stem + ".png"
            png_path = str(self.output_dir / PREDICTIONS_NAME / png_name)
            self.annotations.append(
                prediction_annotation(image_id, png_name, pred_segments, self.categories)
            )
        if image_id is not None:
            self.image_ids.append(image_id)
        where = "image" if image_id is None else f"image {image_id}"
        pred_seg, gt_seg = to_numpy(pred_seg), to_numpy(gt_seg)
        if self.workers:
            pred_seg, gt_seg = _compact(pred_seg), _compact(gt_seg)
        self._submit(
            _arrays_job,
            pred_seg,
            list(pred_segments),
            gt_seg,
            list(gt_segments),
            self.num_classes,
            where,
            png_path,
        )

    def process_files(
        self,
        pred_png: str | Path,
        pred_segments: list[dict],
        gt_png: str | Path,
        gt_segments: list[dict],
        image_id: int | str,
    ) -> None:
        """Add one image stored as COCO panoptic PNGs; segment dicts with contiguous labels.

        The PNGs are read by the workers, ``FILES_PER_TASK`` images a task.
        """
        self.image_ids.append(image_id)
        where = f"image {image_id} ({pred_png})"
        self._files.append(
            (str(pred_png), list(pred_segments), str(gt_png), list(gt_segments), where)
        )
        if self.workers == 0 or len(self._files) == FILES_PER_TASK:
            self._submit_files()

    def _submit_files(self) -> None:
        if self._files:
            self._submit(_files_job, self._files, self.num_classes)
            self._files = []

    def _submit(self, job, *args) -> None:
        if self.workers == 0:
            self._add(job(*args))
            return
        if self._pool is None:
            context = multiprocessing.get_context(self.start_method)
            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=context, initializer=_keep_freed_memory
            )
        if len(self._pending) >= 2 * self.workers:
            self._add_oldest()
        self._pending.append(self._pool.submit(job, *args))

    def _add_oldest(self) -> None:
        try:
            images = self._pending.popleft().result()
        except BaseException:
            self._close_pool()
            raise
        self._add(images)

    def _add(self, images: list[ImageStats]) -> None:
        for stats in images:
            for category, iou in stats.matches:
                self.true_positives[category] += 1
                self.iou_sum[category] += iou
            self.false_positives += stats.false_positives
            self.false_negatives += stats.false_negatives

    def _close_pool(self) -> None:
        """Stop the workers, dropping images not yet added."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
        self._pool = None
        self._pending.clear()
        self._files = []

    def state(self) -> dict:
        """This process's sums, once every submitted image is added (the pool is then closed)."""
        self._submit_files()
        while self._pending:
            self._add_oldest()
        self._close_pool()
        return {
            "iou_sum": self.iou_sum,
            "tp": self.true_positives,
            "fp": self.false_positives,
            "fn": self.false_negatives,
            "image_ids": self.image_ids,
            "annotations": self.annotations,
        }

    @staticmethod
    def merge_states(states: list[dict]) -> dict:
        merged = {
            key: np.sum([state[key] for state in states], axis=0)
            for key in ("iou_sum", "tp", "fp", "fn")
        }
        for key in ("image_ids", "annotations"):
            merged[key] = [entry for state in states for entry in state[key]]
        repeated = sorted(i for i, count in Counter(merged["image_ids"]).items() if count > 1)
        if repeated:
            raise ValueError(
                f"PanopticEvaluator: image ids {repeated[:10]} were processed more than once"
            )
        return merged

    def compute(self, state: dict) -> dict:
        """Metrics (percent) from accumulated per-class sums."""
        iou_sum, tp, fp, fn = state["iou_sum"], state["tp"], state["fp"], state["fn"]
        counted = tp + fp + fn > 0
        denominator = np.where(counted, tp + 0.5 * fp + 0.5 * fn, 1.0)
        pq = np.where(counted, iou_sum / denominator, 0.0)
        sq = np.where(tp > 0, iou_sum / np.maximum(tp, 1), 0.0)
        rq = np.where(counted, tp / denominator, 0.0)

        results = {}
        for suffix, group in (
            ("", np.ones_like(counted)),
            ("_th", self.is_thing),
            ("_st", ~self.is_thing),
        ):
            averaged = counted & group
            for name, values in (("PQ", pq), ("SQ", sq), ("RQ", rq)):
                mean = _sequential_mean(values[averaged]) if averaged.any() else 0.0
                results[name + suffix] = 100 * mean
            results["N" + suffix] = int(averaged.sum())
        results["per_class"] = [
            {
                "id": category["id"],
                "name": category["name"],
                "isthing": int(category["isthing"]),
                "PQ": 100 * float(pq[index]),
                "SQ": 100 * float(sq[index]),
                "RQ": 100 * float(rq[index]),
                "TP": int(tp[index]),
                "FP": int(fp[index]),
                "FN": int(fn[index]),
            }
            for index, category in enumerate(self.categories)
        ]
        return results

    def evaluate(self) -> dict:
        """Metrics over the images processed on all ranks (same result on every rank)."""
        state = self.merge_states(distributed.gather_objects(self.state()))
        if self.output_dir is not None and distributed.is_main():
            write_panoptic_json(self.output_dir / f"{PREDICTIONS_NAME}.json", state["annotations"])
        return self.compute(state)
