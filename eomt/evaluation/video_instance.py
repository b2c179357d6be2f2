"""YouTube-VIS evaluation (video instance segmentation) with the official definitions of
`ytvis_api` (youtubevos/cocoapi's YTVOSeval, as the VidEoMT authors use it): files in, the 12
COCO-style AP / AR numbers out, in percent.

- The IoU of a prediction and a ground-truth track is spatio-temporal: the sum over the
  video's frames of the intersections over the sum of the unions; a frame where one side is
  absent (null) adds the other side's area to the union, a frame where both are, nothing.
- A track's area (small / medium / large) is its mean area over the frames where it is present
  with a nonzero area: the ground truth's `areas` field, a prediction's RLE areas. The ranges
  are [0, 128^2], [128^2, 256^2], [256^2, 1e10] (YTVOSeval's), maxDets 1, 10, 100 per video.
- Matching, AP and AR are COCOeval's (which YTVOSeval copies line for line), with a video in
  place of an image: `VideoCOCOeval` only prepares the tracks and computes their IoUs.

Numbers YTVOSeval reports as -1 (no ground truth in an area range) are NaN. Without any
prediction, every number with ground truth is 0 (YTVOSeval's own result on an empty result
set; its `loadRes` fails on an empty list).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from eomt.evaluation.files import load_json
from eomt.evaluation.semantic import to_numpy

# The order of COCOeval.stats (see eomt.evaluation.instance.COCO_STATS, the same names).
VIS_STATS = (
    *("AP", "AP50", "AP75", "APs", "APm", "APl"),
    *("AR1", "AR10", "AR100", "ARs", "ARm", "ARl"),
)
VIDEO_AREA_RANGES = [[0**2, 1e5**2], [0**2, 128**2], [128**2, 256**2], [256**2, 1e5**2]]


def _mean_area(areas) -> float:
    """YTVOSeval's `avg_area`: the mean of the present, nonzero areas, 0 without any."""
    present = [area for area in areas if area]
    return np.array(present).mean() if present else 0


def _rle(segmentation, height: int, width: int):
    """A frame's compressed RLE (polygons and uncompressed RLE converted), or None if absent."""
    from pycocotools import mask as mask_util

    if not segmentation:
        return None
    if isinstance(segmentation, list):  # polygons, merged into one mask
        return mask_util.merge(mask_util.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):  # uncompressed RLE
        return mask_util.frPyObjects(segmentation, height, width)
    return segmentation


def track_iou(pred: list, gt: list) -> float:
    """Spatio-temporal mask IoU of two tracks (per frame a compressed RLE or None): summed
    intersections over summed unions, 0 when the union is empty (as YTVOSeval)."""
    from pycocotools import mask as mask_util

    intersection = union = 0
    for p, g in zip(pred, gt):
        if p and g:
            intersection += int(mask_util.area(mask_util.merge([p, g], True)))
            union += int(mask_util.area(mask_util.merge([p, g], False)))
        elif p or g:
            union += int(mask_util.area(p or g))
    return intersection / union if union else 0.0


def _video_cocoeval():
    """COCOeval with videos in place of images (pycocotools imported on first use)."""
    from pycocotools.cocoeval import COCOeval

    class VideoCOCOeval(COCOeval):
        """COCOeval over tracks: `gts` and `dts` are dicts with `id`, `video_id`,
        `category_id`, `tracks` (per frame an RLE or None), `area` (the mean area), `iscrowd`
        and (predictions) `score`; `video_ids` play the image ids."""

        def __init__(self, gts: list[dict], dts: list[dict], video_ids, category_ids):
            super().__init__(iouType="segm")
            self.gts, self.dts = gts, dts
            self.params.imgIds = sorted(video_ids)
            self.params.catIds = sorted(category_ids)
            self.params.areaRng = VIDEO_AREA_RANGES

        def _prepare(self):
            self._gts, self._dts = defaultdict(list), defaultdict(list)
            for grouped, items in ((self._gts, self.gts), (self._dts, self.dts)):
                for item in items:
                    grouped[item["video_id"], item["category_id"]].append(item)
            for gt in self.gts:
                gt["ignore"] = bool(gt["iscrowd"])
            self.evalImgs, self.eval = [], {}

        def computeIoU(self, video_id, category_id):
            gt, dt = self._gts[video_id, category_id], self._dts[video_id, category_id]
            if not gt and not dt:
                return []
            order = np.argsort([-d["score"] for d in dt], kind="mergesort")
            dt = [dt[i] for i in order][: self.params.maxDets[-1]]
            ious = np.zeros((len(dt), len(gt)))
            for i, j in np.ndindex(ious.shape):
                ious[i, j] = track_iou(dt[i]["tracks"], gt[j]["tracks"])
            return ious

    return VideoCOCOeval


def _frames(video: dict, where: str) -> int:
    if "length" in video:
        return int(video["length"])
    if "file_names" in video:
        return len(video["file_names"])
    raise ValueError(f"{where}: a video needs length or file_names")


def read_ground_truth(gt_json: str) -> tuple[dict, dict, list[dict]]:
    """({video id: video with its number of `frames`}, {category id: category}, ground-truth
    tracks) of a YouTube-VIS ground-truth JSON, checked (ids, frames per track, areas)."""
    dataset = load_json(gt_json)
    if not isinstance(dataset, dict) or not {"videos", "annotations", "categories"} <= set(dataset):
        raise ValueError(f"{gt_json}: a YouTube-VIS JSON needs videos, annotations, categories")
    videos = {}
    for index, video in enumerate(dataset["videos"]):
        missing = [key for key in ("id", "height", "width") if key not in video]
        if missing:
            raise ValueError(f"{gt_json}: video {index} lacks the key(s) {missing}")
        videos[video["id"]] = {**video, "frames": _frames(video, f"{gt_json}: video {index}")}
    categories = {category["id"]: category for category in dataset["categories"]}
    tracks, ids = [], set()
    for index, annotation in enumerate(dataset["annotations"]):
        where = f"{gt_json}: annotation {index}"
        keys = ("id", "video_id", "category_id", "segmentations", "areas", "iscrowd")
        missing = [key for key in keys if key not in annotation]
        if missing:
            raise ValueError(f"{where} lacks the key(s) {missing}")
        if annotation["id"] in ids:
            raise ValueError(f"{where}: id {annotation['id']} appears twice")
        ids.add(annotation["id"])
        video = videos.get(annotation["video_id"])
        if video is None:
            raise ValueError(f"{where}: video_id {annotation['video_id']} is not in videos")
        if annotation["category_id"] not in categories:
            raise ValueError(f"{where}: category_id {annotation['category_id']} is unknown")
        frames = video["frames"]
        for field in ("segmentations", "areas"):
            if len(annotation[field]) != frames:
                raise ValueError(
                    f"{where}: {field} has {len(annotation[field])} frames, video "
                    f"{video['id']} has {frames}"
                )
        height, width = video["height"], video["width"]
        tracks.append(
            {
                "id": annotation["id"],
                "video_id": annotation["video_id"],
                "category_id": annotation["category_id"],
                "tracks": [_rle(s, height, width) for s in annotation["segmentations"]],
                "area": _mean_area(annotation["areas"]),
                "iscrowd": int(annotation["iscrowd"]),
            }
        )
    return videos, categories, tracks


def read_predictions(pred_json: str, videos: dict, categories: dict) -> list[dict]:
    """The predicted tracks of a YouTube-VIS results JSON (video_id, category_id, score, per
    frame a compressed RLE or null), checked against the ground truth's videos and
    categories; ids 1, 2, ... in file order, as YTVOSeval's loadRes."""
    from pycocotools import mask as mask_util

    results = load_json(pred_json)
    if not isinstance(results, list):
        raise ValueError(f"{pred_json}: a YouTube-VIS results JSON is a list of predictions")
    tracks = []
    for index, result in enumerate(results):
        where = f"{pred_json}: prediction {index}"
        keys = ("video_id", "category_id", "segmentations", "score")
        missing = [key for key in keys if not isinstance(result, dict) or key not in result]
        if missing:
            raise ValueError(f"{where} lacks the key(s) {missing}")
        video = videos.get(result["video_id"])
        if video is None:
            raise ValueError(f"{where}: video_id {result['video_id']} is not in the ground truth")
        if isinstance(result["score"], bool) or not isinstance(result["score"], (int, float)):
            raise ValueError(f"{where}: score {result['score']!r} is not a number")
        if result["category_id"] not in categories:
            raise ValueError(f"{where}: category_id {result['category_id']} is unknown")
        frames = video["frames"]
        segmentations = result["segmentations"]
        if not isinstance(segmentations, list) or len(segmentations) != frames:
            count = len(segmentations) if isinstance(segmentations, list) else "no list of"
            raise ValueError(
                f"{where}: segmentations has {count} frames, video {video['id']} has {frames}"
            )
        size = [video["height"], video["width"]]
        for frame, rle in enumerate(segmentations):
            if rle is None:
                continue
            if not isinstance(rle, dict) or not isinstance(rle.get("counts"), str):
                raise ValueError(
                    f"{where}: segmentations[{frame}] must be null or a compressed RLE dict"
                )
            if list(rle.get("size", ())) != size:
                raise ValueError(
                    f"{where}: segmentations[{frame}] size {rle.get('size')} differs from video "
                    f"{video['id']}'s {size}"
                )
        areas = [int(mask_util.area(rle)) if rle else None for rle in segmentations]
        tracks.append(
            {
                "id": index + 1,
                "video_id": result["video_id"],
                "category_id": result["category_id"],
                "tracks": segmentations,
                "area": _mean_area(areas),
                "iscrowd": 0,
                "score": float(result["score"]),
            }
        )
    return tracks


def video_ap(videos: dict, categories: dict, gts: list[dict], dts: list[dict]):
    """(the 12 numbers and per-class AP in percent, the summary as COCOeval prints it)."""
    from eomt.evaluation.instance import cocoeval_results  # pycocotools, as _video_cocoeval

    coco_eval = _video_cocoeval()(gts, dts, videos, categories)
    names = {
        category_id: category.get("name", str(category_id))
        for category_id, category in categories.items()
    }
    return cocoeval_results(coco_eval, VIS_STATS, names)


def evaluate_files(gt_json: str, pred_json: str) -> tuple[dict, str]:
    """The 12 YouTube-VIS numbers and per-class AP (percent), and the printed summary, of a
    results file against a ground-truth file."""
    videos, categories, gts = read_ground_truth(gt_json)
    dts = read_predictions(pred_json, videos, categories)
    return video_ap(videos, categories, gts, dts)


def format_table(summary: dict, coco_summary: str) -> str:
    """The 12-line summary (fractions, as YTVOSeval prints it), then AP per class."""
    lines = [coco_summary, "", f"{'id':>5s}  {'name':24s} {'AP':>6s}"]
    for row in summary["per_class"]:
        lines.append(f"{row['id']:>5d}  {row['name'][:24]:24s} {row['AP']:6.2f}")
    return "\n".join(lines)


class VideoInstanceFiles:
    """`tools/evaluate.py vis`: a file scorer (the file half of `eomt.tasks.base.Task`'s
    interface) with no image task behind it."""

    name = "vis"
    files_help = "YouTube-VIS AP / AR (ytvis_api's definitions)"

    def add_file_arguments(self, parser) -> None:
        parser.add_argument("--gt-json", required=True, help="YouTube-VIS ground-truth JSON")
        parser.add_argument("--pred-json", required=True, help="YouTube-VIS results JSON")

    def score_files(self, args) -> tuple[dict, str]:
        summary, coco_summary = evaluate_files(args.gt_json, args.pred_json)
        return summary, format_table(summary, coco_summary)


def _frame_rles(masks, keep_empty: bool) -> list[list]:
    """Per track of (N, T, H, W) boolean masks, per frame its compressed RLE (counts as str),
    or None for an empty frame unless `keep_empty` (predictions keep every frame, as the
    authors' results files do)."""
    from eomt.evaluation.instance import _encode_masks  # pycocotools, imported when used

    masks = np.asarray(masks, dtype=bool)
    size = list(masks.shape[-2:])
    return [
        [
            None
            if not keep_empty and not frame.any()
            else {"size": size, "counts": counts.decode("ascii")}
            for frame, counts in zip(track, _encode_masks(track))
        ]
        for track in masks
    ]


def _rle_areas(frames: list) -> list:
    from pycocotools import mask as mask_util

    return [int(mask_util.area(rle)) if rle else None for rle in frames]


class VideoInstanceEvaluator:
    """YouTube-VIS AP / AR of videos evaluated in memory (`video_ap`), in percent; the
    predictions also as a YouTube-VIS results file (`results`, for `tools/evaluate.py vis`).

    Each video is kept as RLEs per frame: ground-truth tracks (None where a track is absent)
    and predicted tracks (every frame)."""

    def __init__(self, categories: list[dict]):
        self.categories = categories
        self.reset()

    def reset(self) -> None:
        self.videos: list[dict] = []
        self._merged: list[dict] | None = None  # every process's videos, after `evaluate`

    def process(self, video_id: int, gt: dict, pred: dict) -> None:
        """Add one video: ``gt`` masks (N, T, H, W), labels (N,) contiguous, optional
        is_crowd (N,); ``pred`` masks (M, T, H, W) bool, scores (M,), labels (M,)."""
        gt_masks = np.asarray(to_numpy(gt["masks"]), dtype=bool)
        pred_masks = np.asarray(to_numpy(pred["masks"]), dtype=bool)
        if gt_masks.ndim != 4:
            raise ValueError(
                f"video {video_id}: gt masks must be (N, T, H, W), got {gt_masks.shape}"
            )
        frames, height, width = gt_masks.shape[1:]
        if len(pred_masks) and pred_masks.shape[1:] != (frames, height, width):
            raise ValueError(
                f"video {video_id}: pred masks {pred_masks.shape} do not match the ground "
                f"truth's (T, H, W) = {(frames, height, width)}"
            )
        crowd = gt.get("is_crowd")
        crowd = np.zeros(len(gt_masks), bool) if crowd is None else to_numpy(crowd).astype(bool)
        gt_labels = to_numpy(gt["labels"]).astype(np.int64)
        # Non-empty tracks of thing classes (a panoptic dataset's stuff is no instance).
        things = [i for i, c in enumerate(self.categories) if c.get("isthing", 1)]
        present = gt_masks.reshape(len(gt_masks), -1).any(1) & np.isin(gt_labels, things)
        self.videos.append(
            {
                "id": video_id,  # YouTube-VIS: an int; VIPSeg: a name
                "height": int(height),
                "width": int(width),
                "frames": int(frames),
                "gt": _frame_rles(gt_masks[present], keep_empty=False),
                "gt_labels": gt_labels[present].tolist(),
                "gt_crowd": crowd[present].tolist(),
                "pred": _frame_rles(pred_masks, keep_empty=True),
                "pred_scores": to_numpy(pred["scores"]).astype(np.float64).tolist(),
                "pred_labels": to_numpy(pred["labels"]).astype(np.int64).tolist(),
            }
        )

    def state(self) -> list[dict]:
        return self.videos

    def merged(self) -> list[dict]:
        from eomt.distributed import gather_objects

        videos = [video for share in gather_objects(self.videos) for video in share]
        ids = [video["id"] for video in videos]
        if len(set(ids)) != len(ids):
            raise ValueError("VideoInstanceEvaluator: the same video_id was processed twice")
        return videos

    def results(self) -> list[dict]:
        """The predictions in the YouTube-VIS results format (dataset category ids): of every
        process after `evaluate`, else of this one."""
        videos = self.videos if self._merged is None else self._merged
        ids = [category["id"] for category in self.categories]
        return [
            {
                "video_id": video["id"],
                "category_id": ids[label],
                "score": float(f"{score:.9g}"),
                "segmentations": frames,
            }
            for video in videos
            for frames, score, label in zip(
                video["pred"], video["pred_scores"], video["pred_labels"]
            )
        ]

    def evaluate(self) -> dict:
        """The 12 numbers (AP, AP50, ..., AR10, ...) and per-class AP, in percent."""
        videos = self._merged = self.merged()
        ids = [category["id"] for category in self.categories]
        categories = {c["id"]: c for c in self.categories if c.get("isthing", 1)}
        gts, dts = [], []
        for video in videos:
            for frames, label, crowd in zip(video["gt"], video["gt_labels"], video["gt_crowd"]):
                gts.append(
                    {
                        "id": len(gts) + 1,
                        "video_id": video["id"],
                        "category_id": ids[label],
                        "tracks": frames,
                        "area": _mean_area(_rle_areas(frames)),
                        "iscrowd": int(crowd),
                    }
                )
            for frames, score, label in zip(
                video["pred"], video["pred_scores"], video["pred_labels"]
            ):
                dts.append(
                    {
                        "id": len(dts) + 1,
                        "video_id": video["id"],
                        "category_id": ids[label],
                        "tracks": frames,
                        "area": _mean_area(_rle_areas(frames)),
                        "iscrowd": 0,
                        "score": score,
                    }
                )
        shape = {video["id"]: video for video in videos}
        results, _ = video_ap(shape, categories, gts, dts)
        return results
