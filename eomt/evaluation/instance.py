"""Instance segmentation mask AP through pycocotools' COCOeval, on results kept in memory."""

import contextlib
import io
import sys
from typing import NamedTuple

import numpy as np
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from eomt.distributed import gather_objects
from eomt.evaluation.semantic import to_numpy

# COCOeval.stats in order: AP over IoU 0.5:0.95, at 0.5, at 0.75, for small / medium / large
# objects, then AR for 1 / 10 / 100 detections per image and for small / medium / large objects.
COCO_STATS = (
    *("AP", "AP50", "AP75", "APs", "APm", "APl"),
    *("AR1", "AR10", "AR100", "ARs", "ARm", "ARl"),
)


def _encode_masks(masks: np.ndarray) -> list[bytes]:
    """The COCO compressed RLE strings (``counts``) of (N, H, W) boolean masks."""
    if not len(masks):
        return []
    rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [rle["counts"] for rle in rles]


class InstanceImage(NamedTuple):
    """One image as ``InstanceEvaluator`` keeps it until ``evaluate``: per mask its compressed
    RLE string (a few hundred bytes where a mask of H x W pixels would take H x W), and arrays
    of labels (contiguous), crowd flags and scores. Built into COCO dicts only at ``compute``.
    """

    image_id: int
    height: int
    width: int
    gt_rles: list[bytes]
    gt_labels: np.ndarray
    gt_crowd: np.ndarray
    pred_rles: list[bytes]
    pred_scores: np.ndarray
    pred_labels: np.ndarray


class InstanceEvaluator:
    """COCO mask AP (``COCOeval(iouType="segm")``) over thing classes, in percent.

    Ground truth keeps only thing categories (``isthing``) and non-empty masks; crowd masks are
    passed to COCOeval as ``iscrowd`` regions. Predictions of non-thing classes are dropped.
    Summary values COCOeval cannot define (e.g. APs without small objects) are NaN, as are the
    per-class APs of classes without ground truth.

    COCOeval needs every mask of every image at the end, so the evaluator keeps them, compactly
    (see ``InstanceImage``): about 60 bytes plus the RLE string per mask and about 1 KB per image,
    where one COCO dict per mask took 500 bytes more per mask (tests/test_memory.py).
    """

    def __init__(self, categories: list[dict], verbose: bool = False):
        self.categories = categories
        self.verbose = verbose
        self.thing_labels = [i for i, category in enumerate(categories) if category["isthing"]]
        self.reset()

    def reset(self) -> None:
        self.images: list[InstanceImage] = []

    def process(self, image_id: int, gt: dict, pred: dict) -> None:
        """Add one image.

        ``gt``: ``masks`` (N, H, W), ``labels`` (N,), ``is_crowd`` (N,).
        ``pred``: ``masks`` (M, H, W) bool, ``scores`` (M,), ``labels`` (M,) contiguous labels.
        """
        image_id = int(image_id)
        gt_masks = to_numpy(gt["masks"]).astype(bool)
        gt_labels = to_numpy(gt["labels"]).astype(np.int64)
        gt_crowd = to_numpy(gt["is_crowd"]).astype(bool)
        pred_masks = to_numpy(pred["masks"]).astype(bool)
        pred_scores = to_numpy(pred["scores"]).astype(np.float64)
        pred_labels = to_numpy(pred["labels"]).astype(np.int64)
        if gt_masks.ndim != 3:
            raise ValueError(f"image {image_id}: gt masks must be (N, H, W), got {gt_masks.shape}")
        height, width = gt_masks.shape[1:]
        if pred_masks.shape[1:] != (height, width) or pred_masks.ndim != 3:
            raise ValueError(
                f"image {image_id}: pred masks {pred_masks.shape} do not match the ground-truth "
                f"size ({height}, {width})"
            )
        if not (len(pred_masks) == len(pred_scores) == len(pred_labels)):
            raise ValueError(
                f"image {image_id}: pred masks, scores and labels differ in length "
                f"({len(pred_masks)}, {len(pred_scores)}, {len(pred_labels)})"
            )
        keep_gt = np.isin(gt_labels, self.thing_labels) & gt_masks.any(axis=(1, 2))
        keep_pred = np.isin(pred_labels, self.thing_labels)
        self.images.append(
            InstanceImage(
                image_id,
                int(height),
                int(width),
                _encode_masks(gt_masks[keep_gt]),
                gt_labels[keep_gt],
                gt_crowd[keep_gt],
                _encode_masks(pred_masks[keep_pred]),
                pred_scores[keep_pred],
                pred_labels[keep_pred],
            )
        )

    def state(self) -> list[InstanceImage]:
        return self.images

    @staticmethod
    def merge_states(states: list[list[InstanceImage]]) -> list[InstanceImage]:
        merged = [image for state in states for image in state]
        image_ids = [image.image_id for image in merged]
        if len(set(image_ids)) != len(image_ids):
            raise ValueError("InstanceEvaluator: the same image_id was processed more than once")
        return merged

    def coco_inputs(self, images: list[InstanceImage]) -> tuple[dict, list[dict]]:
        """The COCO ground-truth dataset (thing categories) and result dicts of `images`."""
        category_ids = [category["id"] for category in self.categories]
        image_infos, annotations, predictions = [], [], []
        for image in images:
            image_id, size = image.image_id, [image.height, image.width]
            image_infos.append({"id": image_id, "height": image.height, "width": image.width})
            gt_rles = [{"size": size, "counts": counts} for counts in image.gt_rles]
            if gt_rles:
                areas, boxes = mask_util.area(gt_rles), mask_util.toBbox(gt_rles)
            for index, (rle, label, crowd) in enumerate(
                zip(gt_rles, image.gt_labels.tolist(), image.gt_crowd.tolist())
            ):
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": category_ids[label],
                        "segmentation": rle,
                        "area": float(areas[index]),
                        "bbox": boxes[index].tolist(),
                        "iscrowd": int(crowd),
                    }
                )
            for counts, score, label in zip(
                image.pred_rles, image.pred_scores.tolist(), image.pred_labels.tolist()
            ):
                # No "bbox" key: loadRes would then take the box area as the mask area.
                predictions.append(
                    {
                        "image_id": image_id,
                        "category_id": category_ids[label],
                        "segmentation": {"size": size, "counts": counts},
                        "score": score,
                    }
                )
        thing_categories = [self.categories[label] for label in self.thing_labels]
        dataset = {
            "images": image_infos,
            "annotations": annotations,
            "categories": [{"id": c["id"], "name": c["name"]} for c in thing_categories],
        }
        return dataset, predictions

    def compute(self, state: list[InstanceImage]) -> dict:
        """AP metrics (percent) and per-class AP from the merged images."""
        coco_gt = COCO()
        coco_gt.dataset, predictions = self.coco_inputs(state)
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt.createIndex()
        results, summary = coco_mask_ap(coco_gt, predictions)
        if self.verbose:
            print(summary)
        return results

    def kept_bytes(self) -> dict:
        """What the evaluator holds per image (its records, RLE strings and arrays), for the
        memory benchmark (tools/benchmark_memory.py)."""
        images = self.images
        total = sys.getsizeof(images)
        masks = 0
        for image in images:
            total += (
                sys.getsizeof(image) + sys.getsizeof(image.gt_rles) + sys.getsizeof(image.pred_rles)
            )
            total += sum(map(sys.getsizeof, image.gt_rles + image.pred_rles))
            arrays = (image.gt_labels, image.gt_crowd, image.pred_scores, image.pred_labels)
            total += sum(map(sys.getsizeof, arrays))
            masks += len(image.gt_rles) + len(image.pred_rles)
        count = max(len(images), 1)
        return {
            "kept_bytes_per_image": round(total / count),
            "kept_masks_per_image": round(masks / count, 1),
            "kept_rle_bytes_per_mask": round(
                sum(len(rle) for i in images for rle in i.gt_rles + i.pred_rles) / max(masks, 1)
            ),
        }

    def evaluate(self) -> dict:
        """Metrics over the images processed on all ranks (same result on every rank)."""
        return self.compute(self.merge_states(gather_objects(self.state())))


def coco_mask_ap(coco_gt: COCO, predictions: list[dict]) -> tuple[dict, str]:
    """COCOeval (segm) of result dicts (``image_id``, ``category_id``, RLE ``segmentation``,
    ``score``) against ``coco_gt``: the 12 COCO numbers and per-class AP in percent, and the
    text COCOeval's ``summarize`` prints.

    Numbers COCOeval cannot define (e.g. APs without small objects) are NaN, as are the
    per-class APs of classes without ground truth. Without any prediction every number is 0.
    """
    categories = [coco_gt.cats[category_id] for category_id in sorted(coco_gt.getCatIds())]
    if not predictions:
        results = {key: 0.0 for key in COCO_STATS}
        results["per_class"] = [{"id": c["id"], "name": c["name"], "AP": 0.0} for c in categories]
        return results, "no predictions"

    with contextlib.redirect_stdout(io.StringIO()):
        # loadRes writes ids, areas and boxes into the dicts it gets, and COCOeval a converted
        # "segmentation": both replace keys of the outer dicts only, so copies of those suffice.
        coco_dt = coco_gt.loadRes([dict(prediction) for prediction in predictions])
    coco_eval = COCOeval(coco_gt, coco_dt, iouType="segm")
    names = {category_id: category["name"] for category_id, category in coco_gt.cats.items()}
    return cocoeval_results(coco_eval, COCO_STATS, names)


def cocoeval_results(coco_eval, stat_names, class_names: dict) -> tuple[dict, str]:
    """Run a prepared COCOeval (evaluate, accumulate, quietly; summarize): its numbers in
    percent (NaN where it has -1: nothing to score), AP per class [{id, name, AP}], and the
    text `summarize` prints. Shared by image (COCO) and video (YouTube-VIS) instances."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval.evaluate()
        coco_eval.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        coco_eval.summarize()
    results = {
        key: 100 * float(value) if value >= 0 else float("nan")
        for key, value in zip(stat_names, coco_eval.stats)
    }
    # precision: (iou thresholds, recall points, classes, area ranges, max detections);
    # area range 0 is "all", the last max-detections setting is 100.
    precision = coco_eval.eval["precision"]
    results["per_class"] = []
    for class_index, category_id in enumerate(coco_eval.params.catIds):
        class_precision = precision[:, :, class_index, 0, -1]
        class_precision = class_precision[class_precision > -1]
        ap = 100 * float(class_precision.mean()) if class_precision.size else float("nan")
        name = class_names.get(category_id, str(category_id))
        results["per_class"].append({"id": int(category_id), "name": name, "AP": ap})
    return results, summary.getvalue().rstrip()
