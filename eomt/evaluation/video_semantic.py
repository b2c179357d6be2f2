"""VSPW video semantic segmentation: mIoU and video consistency (VC8, VC16) with the
definitions of the VSPW evaluation scripts (`utils/eval_miou_vspw.py` and
`utils/eval_vc_vspw.py` of the VidEoMT authors, from DVIS++): files in, percent out.

Files: the ground truth of video V is `GT/data/V/mask/*.png`, single-channel, value v being
class v - 1 for v in 1 .. 124 and ignored otherwise (0 and 255 in VSPW); the prediction is
`PRED/V/<same name>.png` with the class itself (0 .. 123; vss_eval writes 255 where it has
none). The videos are those listed in the split file (`GT/val.txt` by default), frames in
file-name order.

- mIoU: one confusion matrix over every ground-truth pixel that is not ignored, of every
  frame of every video; a class's IoU = TP / (TP + FP + FN); mIoU averages the classes present
  in the ground truth (a class only predicted counts nowhere). Also, from the same matrix:
  pixel accuracy (pACC), mean class accuracy over the classes present (mACC) and
  frequency-weighted IoU (fwIoU). A prediction outside the classes on a pixel the ground truth
  does not ignore is refused (the script would mis-file or crash on it).
- VC_n (n = 8, 16): for each window of n consecutive frames, of the pixels where the ground
  truth keeps one value over the window (raw values, the ignored ones included), the fraction
  where the prediction keeps one value too. The windows start at 0 .. T - n - 1 in a video of
  T frames (the script's range: the last possible window is left out); a video of T <= n
  frames has none. A window whose ground truth changes everywhere is NaN and left out; VC_n is
  the mean over all windows of all videos, not per video.
- VC16 is the number the script prints for 16, which is not reset between its two window
  sizes: the mean over the 8-frame windows and the 16-frame windows together (what the
  evaluation instructions of DVIS++ and VidEoMT give). `VC16_alone` is the mean over the
  16-frame windows alone.

The numbers are those of the scripts to the last bit: the same integer confusion matrix and
window counts, reduced by the same numpy operations in the same order.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from eomt.evaluation.files import require_dir
from eomt.evaluation.semantic import to_numpy

NUM_CLASSES = 124
CLIP_FRAMES = (8, 16)
METRICS = ("mIoU", "fwIoU", "mACC", "pACC", "VC8", "VC16", "VC16_alone")


def read_split(path: str | Path) -> list[str]:
    """The video names of a split file, one a line."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def read_labels(path: Path) -> np.ndarray:
    """A single-channel label PNG as its array (the palette indices of a palette PNG)."""
    if not path.is_file():
        raise FileNotFoundError(f"label PNG not found: {path}")
    try:
        with Image.open(path) as png:
            labels = np.asarray(png)
    except OSError as error:  # a truncated or corrupt file
        raise ValueError(f"{path}: {error}") from error
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{path}: expected a single-channel label PNG, got {labels.dtype} {labels.shape}"
        )
    return labels


class VideoSemanticStats:
    """The confusion matrix and the consistency of every window, accumulated video by video."""

    def __init__(self, num_classes: int = NUM_CLASSES, clip_frames=CLIP_FRAMES):
        self.num_classes = num_classes
        self.clip_frames = tuple(clip_frames)
        self.confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.consistency = {n: [] for n in self.clip_frames}  # per window, in order

    def add_confusion(self, gt: np.ndarray, pred: np.ndarray, where: str) -> None:
        """Ground-truth value v in 1 .. C is class v - 1, anything else is ignored."""
        n = self.num_classes
        valid = (gt >= 1) & (gt <= n)
        truth = gt[valid].astype(np.int64) - 1
        predicted = pred[valid].astype(np.int64)
        if predicted.size and (predicted.min() < 0 or predicted.max() >= n):
            bad = predicted[(predicted < 0) | (predicted >= n)]
            raise ValueError(
                f"{where}: predicted class {int(bad[0])} (on {bad.size} pixels the ground truth "
                f"does not ignore) is outside 0 .. {n - 1}"
            )
        self.confusion += np.bincount(truth * n + predicted, minlength=n * n).reshape(n, n)

    def add_video(self, frames, count: int, where: str) -> None:
        """One video of `count` frames: `frames` yields (ground truth, prediction, name) per
        frame, in order."""
        longest = max(self.clip_frames) - 1
        runs = previous = None  # runs: per pixel, how many frames before have the same value
        for index, (gt, pred, name) in enumerate(frames):
            if pred.shape != gt.shape:
                raise ValueError(
                    f"{where}: {name}: prediction size {pred.shape}, ground truth {gt.shape}"
                )
            if previous is not None and gt.shape != previous[0].shape:
                raise ValueError(
                    f"{where}: {name} has size {gt.shape}, the frame before {previous[0].shape}"
                )
            self.add_confusion(gt, pred, f"{where}: {name}")
            if runs is None:
                runs = [np.zeros(gt.shape, np.uint8), np.zeros(gt.shape, np.uint8)]
            else:
                for run, now, before in zip(runs, (gt, pred), previous):
                    same = now == before
                    np.minimum(run + 1, longest, out=run, where=same)
                    run[~same] = 0
            previous = (gt, pred)
            for n in self.clip_frames:
                # The window of the n frames that ends here, if the script counts it.
                if count > n and n - 1 <= index <= count - 2:
                    kept = runs[0] >= n - 1
                    both = kept & (runs[1] >= n - 1)
                    with np.errstate(invalid="ignore"):
                        self.consistency[n].append(np.int64(both.sum()) / np.int64(kept.sum()))

    def compute(self) -> dict:
        """The metrics in percent (NaN where undefined), the windows counted, per class IoU and
        accuracy (NaN for a class without ground truth)."""
        matrix = self.confusion.astype(np.float64)
        diagonal, truth, predicted = np.diag(matrix), matrix.sum(axis=1), matrix.sum(axis=0)
        present = truth > 0
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of nothing but NaN
            iou = diagonal / (truth + predicted - diagonal)
            accuracy = diagonal / truth
            frequency = truth / matrix.sum()
            values = {
                "mIoU": np.nansum(iou * present) / present.sum(),
                "fwIoU": (frequency[frequency > 0] * iou[frequency > 0]).sum(),
                "mACC": np.nanmean(accuracy),
                "pACC": diagonal.sum() / matrix.sum(),
            }
            pooled = []
            for n in self.clip_frames:
                # The script's list is not reset between window sizes: VC of n pools the
                # windows of n frames with those of the sizes before.
                pooled += self.consistency[n]
                values[f"VC{n}"] = np.nanmean(np.array(pooled, dtype=np.float64))
                if n != self.clip_frames[0]:
                    windows = np.array(self.consistency[n], dtype=np.float64)
                    values[f"VC{n}_alone"] = np.nanmean(windows)
        summary = {key: 100 * float(value) for key, value in values.items()}
        summary["windows"] = {str(n): len(self.consistency[n]) for n in self.clip_frames}
        summary["per_class"] = [
            {
                "id": label,
                "IoU": 100 * float(iou[label]) if present[label] else float("nan"),
                "ACC": 100 * float(accuracy[label]) if present[label] else float("nan"),
            }
            for label in range(self.num_classes)
        ]
        return summary


def evaluate_files(
    gt_dir: str, pred_dir: str, split: str | None = None, num_classes: int = NUM_CLASSES
) -> dict:
    """mIoU, fwIoU, mACC, pACC, VC8, VC16 (percent) of predictions in pred_dir/VIDEO/*.png
    against VSPW ground truth gt_dir/data/VIDEO/mask/*.png, videos from the split file
    (gt_dir/val.txt by default)."""
    if num_classes < 1:
        raise ValueError(f"--num-classes must be at least 1, not {num_classes}")
    gt_root, pred_root = require_dir(gt_dir), require_dir(pred_dir)
    videos = read_split(split if split is not None else gt_root / "val.txt")
    if not videos:
        raise ValueError(f"{split or gt_root / 'val.txt'}: the split file lists no video")
    stats = VideoSemanticStats(num_classes)
    for video in videos:
        masks = gt_root / "data" / video / "mask"
        if not masks.is_dir():
            raise FileNotFoundError(f"no ground-truth folder {masks} for video {video}")
        names = sorted(path.name for path in masks.iterdir() if path.suffix == ".png")
        for name in names:
            if not (pred_root / video / name).is_file():
                raise FileNotFoundError(
                    f"no prediction {pred_root / video / name} for {masks / name}"
                )
        frames = (
            (read_labels(masks / name), read_labels(pred_root / video / name), name)
            for name in names
        )
        stats.add_video(frames, len(names), f"{pred_root / video}")
    return stats.compute()


def format_table(summary: dict) -> str:
    """Per class IoU and accuracy, then the summary line."""
    lines = [f"{'class':>5s} {'IoU':>7s} {'ACC':>7s}"]
    for row in summary["per_class"]:
        if not np.isnan(row["IoU"]):
            lines.append(f"{row['id']:5d} {row['IoU']:7.2f} {row['ACC']:7.2f}")
    windows = ", ".join(f"{count} of {n} frames" for n, count in summary["windows"].items())
    lines += [
        "",
        "  ".join(f"{key} {summary[key]:.2f}" for key in METRICS),
        f"(classes without ground truth left out; windows: {windows})",
    ]
    return "\n".join(lines)


class VideoSemanticFiles:
    """`tools/evaluate.py vss`: a file scorer with no image task behind it."""

    name = "vss"
    files_help = "VSPW mIoU and video consistency VC8 / VC16 (the VSPW scripts' definitions)"

    def add_file_arguments(self, parser) -> None:
        parser.add_argument(
            "--gt-dir", required=True, help="VSPW root: data/VIDEO/mask/*.png and val.txt"
        )
        parser.add_argument("--pred-dir", required=True, help="predicted PNGs: VIDEO/*.png")
        parser.add_argument(
            "--split", help="file listing the videos, one a line (default: GT_DIR/val.txt)"
        )
        parser.add_argument(
            "--num-classes", type=int, default=NUM_CLASSES, help="classes (default: 124)"
        )

    def score_files(self, args) -> tuple[dict, str]:
        summary = evaluate_files(args.gt_dir, args.pred_dir, args.split, args.num_classes)
        return summary, format_table(summary)


class VideoSemanticEvaluator:
    """mIoU and video consistency of videos evaluated in memory (the training-time evaluation
    of task vss), with `VideoSemanticStats`: the ground truth of a frame is its tracks' labels
    + 1, 0 (ignored) where no track is."""

    def __init__(self, categories: list[dict], clip_frames=CLIP_FRAMES):
        self.categories = categories
        self.clip_frames = clip_frames
        self.reset()

    def reset(self) -> None:
        self.stats = VideoSemanticStats(len(self.categories), self.clip_frames)

    def process(self, video_id, gt: dict, pred) -> None:
        """gt: masks (N, T, H, W), labels (N,) contiguous; pred: classes (T, H, W)."""
        masks = to_numpy(gt["masks"]).astype(bool)
        labels, pred = to_numpy(gt["labels"]), to_numpy(pred)

        def frames():
            for t in range(pred.shape[0]):
                truth = np.zeros(pred.shape[1:], np.int64)
                for mask, label in zip(masks[:, t], labels):
                    truth[mask] = label + 1
                yield truth, pred[t], f"frame {t}"

        self.stats.add_video(frames(), pred.shape[0], f"video {video_id}")

    def evaluate(self) -> dict:
        from eomt.distributed import gather_objects

        shares = gather_objects(self.stats)
        total = VideoSemanticStats(len(self.categories), self.clip_frames)
        for share in shares:
            total.confusion += share.confusion
            for n in self.clip_frames:
                total.consistency[n] += share.consistency[n]
        return total.compute()
