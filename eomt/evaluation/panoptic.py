"""Panoptic quality (PQ, SQ, RQ) with the matching rules of the COCO panoptic API's pq_compute."""

import numpy as np
import torch

from eomt.evaluation.semantic import gather_states, to_numpy


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


def _segments_by_id(segments: list[dict], num_classes: int, what: str) -> dict[int, dict]:
    by_id: dict[int, dict] = {}
    for segment in segments:
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


def _check_ids_match(segment_map: np.ndarray, by_id: dict[int, dict], what: str) -> None:
    ids_in_map = set(np.unique(segment_map).tolist()) - {0}
    if ids_in_map - by_id.keys():
        raise ValueError(
            f"{what} map has segment ids {sorted(ids_in_map - by_id.keys())} "
            "that are missing from its segment list"
        )
    if by_id.keys() - ids_in_map:
        raise ValueError(
            f"{what} segment list has ids {sorted(by_id.keys() - ids_in_map)} "
            "that cover no pixel of its map"
        )


class PanopticEvaluator:
    """PQ / SQ / RQ identical to the COCO panoptic API (panopticapi ``pq_compute``).

    Per image: a prediction and a non-crowd ground-truth segment of the same class match when
    IoU > 0.5, where the union leaves out the prediction's pixels on void (IoU = intersection /
    (union - prediction area on void)). Unmatched non-crowd ground truth counts as FN; crowd
    ground truth never does. An unmatched prediction counts as FP unless more than half of it lies
    on void plus the crowd region of its own class (pq_compute keeps one crowd region per class:
    the last one listed). Class scores: PQ = sum IoU / (TP + FP/2 + FN/2), SQ = sum IoU / TP,
    RQ = TP / (TP + FP/2 + FN/2); All / Things / Stuff average over the classes of the group with
    TP + FP + FN > 0 (0 for a group with no such class). Results are in percent.
    """

    def __init__(self, categories: list[dict]):
        self.categories = categories
        self.num_classes = len(categories)
        self.is_thing = np.array([bool(category["isthing"]) for category in categories])
        self.reset()

    def reset(self) -> None:
        self.iou_sum = np.zeros(self.num_classes, dtype=np.float64)
        self.true_positives = np.zeros(self.num_classes, dtype=np.int64)
        self.false_positives = np.zeros(self.num_classes, dtype=np.int64)
        self.false_negatives = np.zeros(self.num_classes, dtype=np.int64)

    def process(
        self,
        pred_seg: np.ndarray | torch.Tensor,
        pred_segments: list[dict],
        gt_seg: np.ndarray | torch.Tensor,
        gt_segments: list[dict],
    ) -> None:
        """Add one image: segment-id maps (0 = void) with their segment dicts."""
        pred_seg = to_numpy(pred_seg).astype(np.int64)
        gt_seg = to_numpy(gt_seg).astype(np.int64)
        if pred_seg.shape != gt_seg.shape:
            raise ValueError(f"pred_seg shape {pred_seg.shape} != gt_seg shape {gt_seg.shape}")
        pred_by_id = _segments_by_id(pred_segments, self.num_classes, "predicted")
        gt_by_id = _segments_by_id(gt_segments, self.num_classes, "ground-truth")
        _check_ids_match(pred_seg, pred_by_id, "predicted")
        _check_ids_match(gt_seg, gt_by_id, "ground-truth")

        pred_ids, pred_areas = np.unique(pred_seg, return_counts=True)
        pred_area = dict(zip(pred_ids.tolist(), pred_areas.tolist()))
        gt_ids, gt_areas = np.unique(gt_seg, return_counts=True)
        gt_area = dict(zip(gt_ids.tolist(), gt_areas.tolist()))

        # Pixel counts of every (gt id, pred id) pair, void (0) included on both sides.
        offset = int(pred_seg.max()) + 1
        pair_codes, pair_counts = np.unique(gt_seg * offset + pred_seg, return_counts=True)
        intersection = {
            (code // offset, code % offset): count
            for code, count in zip(pair_codes.tolist(), pair_counts.tolist())
        }

        matched_gt, matched_pred = set(), set()
        for (gt_id, pred_id), overlap in intersection.items():
            if gt_id == 0 or pred_id == 0:
                continue
            gt, pred = gt_by_id[gt_id], pred_by_id[pred_id]
            if gt["iscrowd"] or gt["category_id"] != pred["category_id"]:
                continue
            pred_on_void = intersection.get((0, pred_id), 0)
            union = pred_area[pred_id] + gt_area[gt_id] - overlap - pred_on_void
            iou = overlap / union
            if iou > 0.5:
                self.true_positives[gt["category_id"]] += 1
                self.iou_sum[gt["category_id"]] += iou
                matched_gt.add(gt_id)
                matched_pred.add(pred_id)

        crowd_id_by_class = {}
        for gt_id, gt in gt_by_id.items():
            if gt_id in matched_gt:
                continue
            if gt["iscrowd"]:
                crowd_id_by_class[gt["category_id"]] = gt_id
                continue
            self.false_negatives[gt["category_id"]] += 1

        for pred_id, pred in pred_by_id.items():
            if pred_id in matched_pred:
                continue
            ignored_area = intersection.get((0, pred_id), 0)
            crowd_id = crowd_id_by_class.get(pred["category_id"])
            if crowd_id is not None:
                ignored_area += intersection.get((crowd_id, pred_id), 0)
            if ignored_area / pred_area[pred_id] > 0.5:
                continue
            self.false_positives[pred["category_id"]] += 1

    def state(self) -> dict[str, np.ndarray]:
        return {
            "iou_sum": self.iou_sum,
            "tp": self.true_positives,
            "fp": self.false_positives,
            "fn": self.false_negatives,
        }

    @staticmethod
    def merge_states(states: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        return {key: np.sum([state[key] for state in states], axis=0) for key in states[0]}

    def compute(self, state: dict[str, np.ndarray]) -> dict:
        """Metrics (percent) from accumulated per-class sums."""
        iou_sum, tp, fp, fn = state["iou_sum"], state["tp"], state["fp"], state["fn"]
        counted = tp + fp + fn > 0
        denominator = np.maximum(tp + 0.5 * fp + 0.5 * fn, 1e-12)
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
                mean = values[averaged].mean() if averaged.any() else 0.0
                results[name + suffix] = 100 * float(mean)
        results["per_class"] = [
            {
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
        return self.compute(self.merge_states(gather_states(self.state())))
