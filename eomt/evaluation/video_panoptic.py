"""VIPSeg video panoptic quality (VPQ) with the definitions of the VIPSeg evaluation script
(`utils/eval_vpq_vspw.py` of the VidEoMT authors, from DVIS++): files in, VPQ in percent out.

- A window of n consecutive frames (n = 1, 2, 4, 6, 8, called k = 5 (n - 1) = 0, 5, 15, 25,
  35) is scored as one panoptic image made of its frames side by side: a segment id is a tube
  over the window's frames, its area the sum over them. Every window start 0 .. T - n of a
  video of T frames counts; a video shorter than n frames has no window of n.
- In a window, the rules are those of image PQ (pq_compute): a prediction and a non-crowd
  ground-truth tube of the same category match when IoU > 0.5, the union leaving out the
  prediction's pixels on void (id 0); unmatched non-crowd ground truth is a FN; an unmatched
  prediction is a FP unless more than half of it lies on void plus the crowd tube of its
  category (the last crowd tube of that category in the window's order of first listing).
- A tube's category (and crowd flag) is that of the first frame of the window that lists its
  id; a ground-truth tube's area is the sum of the JSON `area` of its entries in the window
  (as the script, not the pixels; without an `area` key: the frame's pixel count), a
  prediction's the number of its pixels in the PNGs. Ids repeated in one frame's
  `segments_info` are one segment (the first entry's category, the areas added up), as the
  script reads them (vps_eval writes a stuff category's segments under one id). Ground-truth
  ids in a PNG but not in its JSON are neither segment nor void.
- Per window, the statistics (IoU sum, TP, FP, FN per category) are added over every window
  of every video; PQ = IoU sum / (TP + FP/2 + FN/2) per category, averaged over the categories
  with TP + FP + FN > 0: All, Things (isthing == 1) and Stuff (the others). VPQ is the mean
  of the five window sizes' PQ, for All, Things and Stuff.

The IoU sums are added in the script's order (pairs in (ground-truth id, predicted id)
order, windows in order, per video, then videos in the ground truth's order) so that the
numbers are the script's to the last bit. A group without any counted category, where the
script divides by zero, is NaN.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from eomt.evaluation.files import load_json, require_dir
from eomt.evaluation.panoptic import _pair_counts
from eomt.evaluation.panoptic_io import read_panoptic_png
from eomt.evaluation.semantic import to_numpy

WINDOW_FRAMES = (1, 2, 4, 6, 8)  # frames of a window; its name k is 5 (frames - 1)
FRAME_STEP = 5
ID_BITS = 24  # a segment id fits 24 bits (three 8-bit channels)
GROUPS = (("All", None), ("Things", True), ("Stuff", False))


class Frame(NamedTuple):
    """What a window needs of one frame.

    ``pairs``: (ground-truth id << 24 | predicted id) of every pair of ids on the frame's
    pixels, sorted, with ``counts`` their pixels. ``gt``: id -> [category, iscrowd, area] of the
    listed ground truth, ``pred``: id -> [category, pixels] of the listed predictions, both in
    order of first listing.
    """

    pairs: np.ndarray
    counts: np.ndarray
    gt: dict
    pred: dict


def _merged(segments: list, keys: tuple[str, ...], where: str) -> dict:
    """id -> the first entry of that id (a list of its `keys` values), areas added up."""
    merged: dict = {}
    for index, segment in enumerate(segments):
        if not isinstance(segment, dict):
            raise ValueError(f"{where}: segments_info[{index}] is not an object")
        missing = [key for key in ("id", *keys) if key != "area" and key not in segment]
        if missing:
            raise ValueError(f"{where}: segments_info[{index}] lacks the key(s) {missing}")
        segment_id = segment["id"]
        if isinstance(segment_id, bool) or not isinstance(segment_id, int):
            raise ValueError(f"{where}: segments_info[{index}] id {segment_id!r} is no integer")
        values = [segment.get(key) for key in keys]
        if segment_id not in merged:
            merged[segment_id] = values
        elif "area" in keys and values[-1] is not None and merged[segment_id][-1] is not None:
            merged[segment_id][-1] += values[-1]
    return merged


def read_frame(
    gt_png: Path,
    gt_segments: list,
    pred_png: Path,
    pred_segments: list,
    categories: dict,
    where: tuple[str, str],
) -> Frame:
    """One frame's pair counts and segments, checked as the script checks them (every
    predicted id in the PNG listed in the JSON and vice versa, known categories). `where`:
    the frame in the ground truth's and in the predictions' error messages."""
    gt_where, where = where
    gt_map, pred_map = read_panoptic_png(gt_png), read_panoptic_png(pred_png)
    if gt_map.shape != pred_map.shape:
        raise ValueError(f"{where}: {pred_png} has size {pred_map.shape}, {gt_png} {gt_map.shape}")
    gt_ids, pred_ids, counts = _pair_counts(gt_map, pred_map)
    pairs = gt_ids << ID_BITS | pred_ids

    gt = _merged(gt_segments, ("category_id", "iscrowd", "area"), f"{gt_where}: ground truth")
    for segment_id, (category, _, area) in gt.items():
        if category not in categories:
            raise ValueError(
                f"{gt_where}: ground-truth segment {segment_id} has unknown category_id {category}"
            )
        if area is None:  # no area in the JSON: the pixels
            gt[segment_id][2] = int(counts[gt_ids == segment_id].sum())
        elif isinstance(area, bool) or not isinstance(area, (int, float)):
            raise ValueError(
                f"{gt_where}: ground-truth segment {segment_id} area {area!r} is no number"
            )

    pred = _merged(pred_segments, ("category_id",), f"{where}: prediction")
    pixels = np.bincount(np.searchsorted(np.unique(pred_ids), pred_ids), weights=counts)
    area_of = dict(zip(np.unique(pred_ids).tolist(), pixels.astype(np.int64).tolist()))
    unlisted = sorted(i for i in area_of if i not in pred and i != 0)
    if unlisted:
        raise ValueError(
            f"{where}: {pred_png} has segment ids {unlisted} missing from its segments_info"
        )
    absent = sorted(i for i in pred if i not in area_of)
    if absent:
        raise ValueError(
            f"{where}: segments_info lists ids {absent} that cover no pixel of {pred_png}"
        )
    for segment_id, entry in pred.items():
        if entry[0] not in categories:
            raise ValueError(
                f"{where}: predicted segment {segment_id} has unknown category_id {entry[0]}"
            )
        entry.append(area_of[segment_id])
    return Frame(pairs, counts, gt, pred)


class Stats:
    """IoU sum, TP, FP, FN per category id."""

    def __init__(self):
        self.iou: dict = {}
        self.tp: dict = {}
        self.fp: dict = {}
        self.fn: dict = {}

    def add(self, counts: dict, category, value) -> None:
        counts[category] = counts.get(category, 0) + value

    def __iadd__(self, other: Stats) -> Stats:
        for mine, theirs in (
            (self.iou, other.iou),
            (self.tp, other.tp),
            (self.fp, other.fp),
            (self.fn, other.fn),
        ):
            for category, value in theirs.items():
                mine[category] = mine.get(category, 0.0 if mine is self.iou else 0) + value
        return self


def window_stats(frames: list[Frame], stats: Stats, where: str) -> None:
    """Add one window's statistics (its frames as one panoptic image) to `stats`."""
    gt: dict = {}  # id -> [category, iscrowd, area], first frame's category
    pred: dict = {}  # id -> [category, pixels]
    for frame in frames:
        for segment_id, (category, crowd, area) in frame.gt.items():
            if segment_id in gt:
                gt[segment_id][2] += area
            else:
                gt[segment_id] = [category, crowd, area]
        for segment_id, (category, pixels) in frame.pred.items():
            if segment_id in pred:
                pred[segment_id][1] += pixels
            else:
                pred[segment_id] = [category, pixels]
    if len(frames) == 1:
        pairs, overlaps = frames[0].pairs, frames[0].counts
    else:
        pairs, inverse = np.unique(np.concatenate([f.pairs for f in frames]), return_inverse=True)
        overlaps = np.bincount(
            inverse.ravel(), weights=np.concatenate([f.counts for f in frames])
        ).astype(np.int64)
    gt_ids, pred_ids = pairs >> ID_BITS, pairs & ((1 << ID_BITS) - 1)
    overlap = dict(zip(pairs.tolist(), overlaps.tolist()))

    # Candidate pairs: both listed, ground truth not crowd, same category (vectorised lookup).
    gt_keys = np.array(sorted(gt), dtype=np.int64)
    pred_keys = np.array(sorted(pred), dtype=np.int64)
    gt_index = np.searchsorted(gt_keys, gt_ids).clip(max=max(len(gt_keys) - 1, 0))
    pred_index = np.searchsorted(pred_keys, pred_ids).clip(max=max(len(pred_keys) - 1, 0))
    candidate = np.zeros(len(pairs), dtype=bool)
    if len(gt_keys) and len(pred_keys):
        gt_rows = [gt[i] for i in gt_keys.tolist()]
        pred_rows = [pred[i] for i in pred_keys.tolist()]
        gt_category = np.array([row[0] for row in gt_rows], dtype=object)
        gt_crowd = np.array([row[1] == 1 for row in gt_rows])
        pred_category = np.array([row[0] for row in pred_rows], dtype=object)
        candidate = (gt_keys[gt_index] == gt_ids) & (pred_keys[pred_index] == pred_ids)
        candidate &= ~gt_crowd[gt_index]
        candidate &= gt_category[gt_index] == pred_category[pred_index]
    matched_gt, matched_pred = set(), set()
    for position in np.flatnonzero(candidate).tolist():
        gt_id, pred_id = int(gt_ids[position]), int(pred_ids[position])
        intersection = int(overlaps[position])
        category, _, gt_area = gt[gt_id]
        on_void = overlap.get(pred_id, 0)  # the pair (void, pred_id)
        union = pred[pred_id][1] + gt_area - intersection - on_void
        iou = np.float64(intersection) / np.float64(union)
        if iou > 1.0:
            raise ValueError(
                f"{where}: ground-truth segment {gt_id} has an area ({gt_area}) smaller than "
                f"its pixels (IoU {float(iou):.3f} with predicted segment {pred_id})"
            )
        if iou > 0.5:
            stats.add(stats.tp, category, 1)
            stats.add(stats.iou, category, float(iou))
            matched_gt.add(gt_id)
            matched_pred.add(pred_id)

    crowd_of: dict = {}
    for gt_id, (category, crowd, _) in gt.items():
        if gt_id in matched_gt:
            continue
        if crowd == 1:
            crowd_of[category] = gt_id
            continue
        stats.add(stats.fn, category, 1)
    for pred_id, (category, pixels) in pred.items():
        if pred_id in matched_pred:
            continue
        ignored = overlap.get(pred_id, 0)
        if category in crowd_of:
            ignored += overlap.get(crowd_of[category] << ID_BITS | pred_id, 0)
        if ignored / pixels > 0.5:
            continue
        stats.add(stats.fp, category, 1)


def video_stats(frames: list[Frame], window: int, where: str) -> Stats:
    """The statistics of every window of `window` frames of one video, in order."""
    stats = Stats()
    for start in range(len(frames) - window + 1):
        window_stats(frames[start : start + window], stats, f"{where}, frames {start}+{window}")
    return stats


def pq_average(stats: Stats, categories: dict) -> dict:
    """PQ, SQ, RQ (fractions) and N of All / Things / Stuff, and the per-class numbers, as the
    script averages them (classes in the ground truth's order, sums added one by one)."""
    per_class = {}
    for category_id in categories:
        iou, tp = stats.iou.get(category_id, 0.0), stats.tp.get(category_id, 0)
        fp, fn = stats.fp.get(category_id, 0), stats.fn.get(category_id, 0)
        row = {"IoU": iou, "TP": tp, "FP": fp, "FN": fn, "counted": tp + fp + fn > 0}
        if row["counted"]:
            row["PQ"] = iou / (tp + 0.5 * fp + 0.5 * fn)
            row["SQ"] = iou / tp if tp != 0 else 0
            row["RQ"] = tp / (tp + 0.5 * fp + 0.5 * fn)
        else:
            row["PQ"] = row["SQ"] = row["RQ"] = 0.0
        per_class[category_id] = row
    groups = {}
    for name, thing in GROUPS:
        sums, n = {"PQ": 0, "SQ": 0, "RQ": 0}, 0
        for category_id, category in categories.items():
            if thing is not None and thing != (category["isthing"] == 1):
                continue
            row = per_class[category_id]
            if not row["counted"]:
                continue
            n += 1
            for key in sums:
                sums[key] += row[key]
        groups[name] = {key: value / n if n else float("nan") for key, value in sums.items()}
        groups[name]["N"] = n
    return {"groups": groups, "per_class": per_class}


def _check_segments_info(annotations, where: str) -> None:
    for index, annotation in enumerate(annotations):
        if not isinstance(annotation, dict) or not isinstance(
            annotation.get("segments_info"), list
        ):
            raise ValueError(f"{where}: frame {index} lacks a segments_info list")


def read_videos(gt_json: str, gt_dir: str, pred_json: str, pred_dir: str):
    """(categories by id, per video (video id, [(gt PNG, gt segments, pred PNG, pred segments)
    per frame])) of a VIPSeg ground truth and vps_eval's predictions, checked."""
    gt = load_json(gt_json)
    if not isinstance(gt, dict) or not {"videos", "annotations", "categories"} <= set(gt):
        raise ValueError(f"{gt_json}: a VIPSeg panoptic JSON needs videos, annotations, categories")
    pred = load_json(pred_json)
    if not isinstance(pred, dict) or not isinstance(pred.get("annotations"), list):
        raise ValueError(f"{pred_json}: expected a JSON object with an annotations list")
    gt_dir, pred_dir = require_dir(gt_dir), require_dir(pred_dir)

    categories = {}
    for index, category in enumerate(gt["categories"]):
        missing = [key for key in ("id", "isthing") if key not in category]
        if missing:
            raise ValueError(f"{gt_json}: categories[{index}] lacks the key(s) {missing}")
        if category["id"] in categories:
            raise ValueError(f"{gt_json}: category id {category['id']} appears twice")
        categories[category["id"]] = category

    def by_video(annotations, path):
        videos = {}
        for index, entry in enumerate(annotations):
            if not isinstance(entry, dict) or not {"video_id", "annotations"} <= set(entry):
                raise ValueError(f"{path}: annotations[{index}] needs video_id and annotations")
            if entry["video_id"] in videos:
                raise ValueError(f"{path}: video {entry['video_id']} appears twice in annotations")
            _check_segments_info(entry["annotations"], f"{path}: video {entry['video_id']}")
            videos[entry["video_id"]] = entry["annotations"]
        return videos

    gt_frames, pred_frames = (
        by_video(gt["annotations"], gt_json),
        by_video(pred["annotations"], pred_json),
    )
    videos = []
    for index, video in enumerate(gt["videos"]):
        if not isinstance(video, dict) or not {"video_id", "images"} <= set(video):
            raise ValueError(f"{gt_json}: videos[{index}] needs video_id and images")
        video_id, images = video["video_id"], video["images"]
        if video_id not in gt_frames:
            raise ValueError(f"{gt_json}: video {video_id} has no entry in annotations")
        if video_id not in pred_frames:
            raise ValueError(f"{pred_json}: no prediction for video {video_id}")
        truth, predicted = gt_frames[video_id], pred_frames[video_id]
        if len(truth) != len(images):
            raise ValueError(
                f"{gt_json}: video {video_id} has {len(images)} images and "
                f"{len(truth)} annotated frames"
            )
        if len(predicted) != len(images):
            raise ValueError(
                f"{pred_json}: video {video_id} has {len(predicted)} frames, the "
                f"ground truth {len(images)}"
            )
        frames = []
        for frame, image in enumerate(images):
            if not isinstance(image, dict) or "file_name" not in image:
                raise ValueError(f"{gt_json}: video {video_id} image {frame} lacks file_name")
            name = image["file_name"]
            frames.append(
                (
                    gt_dir / str(video_id) / name,
                    truth[frame]["segments_info"],
                    pred_dir / str(video_id) / name,
                    predicted[frame]["segments_info"],
                )
            )
        videos.append((video_id, frames))
    return categories, videos


def vpq(categories: dict, videos: list, windows=WINDOW_FRAMES, gt_json="", pred_json="") -> dict:
    """VPQ (percent) of `read_videos`' output: per window size the All / Things / Stuff PQ, SQ,
    RQ, N and per-class numbers, and the mean over the window sizes."""
    totals = {window: Stats() for window in windows}
    for video_id, files in videos:
        frames = []
        for index, (gt_png, gt_segments, pred_png, pred_segments) in enumerate(files):
            where = (
                f"{gt_json}: video {video_id} frame {index}",
                f"{pred_json}: video {video_id} frame {index}",
            )
            frames.append(
                read_frame(gt_png, gt_segments, pred_png, pred_segments, categories, where)
            )
        for window in windows:
            totals[window] += video_stats(frames, window, f"{gt_json}: video {video_id}")

    summary: dict = {}
    per_window = {}
    for window in windows:
        result = pq_average(totals[window], categories)
        per_window[str(FRAME_STEP * (window - 1))] = {
            "frames": window,
            **{
                name: {key: 100 * value if key != "N" else value for key, value in row.items()}
                for name, row in result["groups"].items()
            },
            "per_class": {
                str(category_id): {
                    "name": categories[category_id].get("name", str(category_id)),
                    "isthing": int(categories[category_id]["isthing"] == 1),
                    **{key: 100 * row[key] for key in ("PQ", "SQ", "RQ")},
                    **{key: row[key] for key in ("IoU", "TP", "FP", "FN")},
                }
                for category_id, row in result["per_class"].items()
            },
        }
    for name, key in (("All", "VPQ"), ("Things", "VPQ_thing"), ("Stuff", "VPQ_stuff")):
        values = [per_window[k][name]["PQ"] for k in per_window]
        summary[key] = sum(values) / len(values)
    summary["windows"] = per_window
    return summary


def evaluate_files(gt_json: str, gt_dir: str, pred_json: str, pred_dir: str) -> dict:
    """VPQ of vps_eval's predictions (pred.json and pan_pred/VIDEO/FRAME.png) against VIPSeg
    ground truth (its panoptic JSON and panomasksRGB/VIDEO/FRAME.png)."""
    categories, videos = read_videos(gt_json, gt_dir, pred_json, pred_dir)
    return vpq(categories, videos, gt_json=gt_json, pred_json=pred_json)


def format_table(summary: dict) -> str:
    """Per window size the PQ, SQ, RQ of All / Things / Stuff, then VPQ (their mean)."""
    lines = [
        f"{'k':>3s} {'frames':>6s} | {'PQ':>6s} {'SQ':>6s} {'RQ':>6s} | "
        f"{'PQ_th':>6s} {'PQ_st':>6s} | {'N':>4s} {'N_th':>4s} {'N_st':>4s}",
        "-" * 62,
    ]
    for k, row in summary["windows"].items():
        lines.append(
            f"{k:>3s} {row['frames']:6d} | {row['All']['PQ']:6.2f} {row['All']['SQ']:6.2f} "
            f"{row['All']['RQ']:6.2f} | {row['Things']['PQ']:6.2f} {row['Stuff']['PQ']:6.2f} | "
            f"{row['All']['N']:4d} {row['Things']['N']:4d} {row['Stuff']['N']:4d}"
        )
    lines += [
        "",
        f"VPQ {summary['VPQ']:.2f}  VPQ_thing {summary['VPQ_thing']:.2f}  "
        f"VPQ_stuff {summary['VPQ_stuff']:.2f}",
    ]
    return "\n".join(lines)


class VideoPanopticFiles:
    """`tools/evaluate.py vps`: a file scorer with no image task behind it."""

    name = "vps"
    files_help = "VIPSeg VPQ (the definitions of the VIPSeg eval_vpq script)"

    def add_file_arguments(self, parser) -> None:
        parser.add_argument("--gt-json", required=True, help="VIPSeg panoptic ground-truth JSON")
        parser.add_argument(
            "--gt-dir", required=True, help="ground-truth PNG folders (panomasksRGB/VIDEO/*.png)"
        )
        parser.add_argument("--pred-json", required=True, help="predictions JSON (pred.json)")
        parser.add_argument(
            "--pred-dir", required=True, help="predicted PNG folders (pan_pred/VIDEO/*.png)"
        )

    def score_files(self, args) -> tuple[dict, str]:
        summary = evaluate_files(args.gt_json, args.gt_dir, args.pred_json, args.pred_dir)
        return summary, format_table(summary)


class VideoPanopticEvaluator:
    """VPQ of videos evaluated in memory (the training-time evaluation of task vps), with the
    rules of `vpq`: each video's frames become `Frame`s (ground-truth segment n is track n + 1,
    its area its pixels in the frame) and every window's statistics are added up as the video
    comes; only those are kept."""

    def __init__(self, categories: list[dict], windows=WINDOW_FRAMES):
        self.categories = categories
        self.by_id = {c["id"]: c for c in categories}
        self.windows = tuple(windows)
        self.reset()

    def reset(self) -> None:
        self.totals = {window: Stats() for window in self.windows}

    def process(self, video_id, gt: dict, pred: dict) -> None:
        """gt: masks (N, T, H, W), labels (N,) contiguous, optional is_crowd (N,); pred:
        segments (T, H, W) ids, segments_info [{id, label}] (`video_panoptic_inference`)."""
        masks = to_numpy(gt["masks"]).astype(bool)
        labels = to_numpy(gt["labels"]).astype(np.int64)
        crowd = gt.get("is_crowd")
        crowd = np.zeros(len(masks), bool) if crowd is None else to_numpy(crowd).astype(bool)
        segments = to_numpy(pred["segments"]).astype(np.int64)
        if masks.ndim != 4 or segments.shape != masks.shape[1:]:
            raise ValueError(
                f"video {video_id}: predicted segments {segments.shape} and ground-truth "
                f"masks {masks.shape} must be (T, H, W) and (N, T, H, W)"
            )
        ids = [c["id"] for c in self.categories]
        pred_category = {s["id"]: ids[s["label"]] for s in pred["segments_info"]}
        frames = []
        for t in range(segments.shape[0]):
            gt_map = np.zeros(segments.shape[1:], np.int64)
            gt_segments = {}
            for n in range(len(masks)):
                area = int(masks[n, t].sum())
                if area:
                    gt_map[masks[n, t]] = n + 1
                    gt_segments[n + 1] = [ids[labels[n]], int(crowd[n]), area]
            gt_ids, pred_ids, counts = _pair_counts(gt_map, segments[t])
            present = np.unique(segments[t])
            pixels = np.bincount(segments[t].ravel())
            pred_segments = {
                int(i): [pred_category[int(i)], int(pixels[i])] for i in present if i != 0
            }
            frames.append(Frame(gt_ids << ID_BITS | pred_ids, counts, gt_segments, pred_segments))
        for window in self.windows:
            self.totals[window] += video_stats(frames, window, f"video {video_id}")

    def evaluate(self) -> dict:
        """VPQ, VPQ_thing, VPQ_stuff (percent) and per window size All / Things / Stuff PQ."""
        from eomt.distributed import gather_objects

        totals = {window: Stats() for window in self.windows}
        for share in gather_objects(self.totals):
            for window in self.windows:
                totals[window] += share[window]
        per_window = {}
        for window in self.windows:
            groups = pq_average(totals[window], self.by_id)["groups"]
            per_window[str(FRAME_STEP * (window - 1))] = {
                name: {key: 100 * value if key != "N" else value for key, value in row.items()}
                for name, row in groups.items()
            }
        summary: dict = {}
        for name, key in (("All", "VPQ"), ("Things", "VPQ_thing"), ("Stuff", "VPQ_stuff")):
            values = [per_window[k][name]["PQ"] for k in per_window]
            summary[key] = sum(values) / len(values)
        summary["windows"] = per_window
        return summary
