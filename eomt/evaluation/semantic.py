"""Semantic segmentation evaluation (mIoU and friends) from a confusion matrix."""

from __future__ import annotations

import csv
import os
import sys
from typing import TYPE_CHECKING

import numpy as np

from eomt.distributed import gather_objects

if TYPE_CHECKING:  # torch only in annotations: importing this module stays cheap
    import torch


def to_numpy(array: np.ndarray | torch.Tensor) -> np.ndarray:
    torch = sys.modules.get("torch")  # a tensor means torch is imported already
    if torch is not None and isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def masks_to_semantic(
    masks: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    is_crowd: torch.Tensor | np.ndarray,
    ignore_index: int = 255,
) -> np.ndarray:
    """Label map (H, W) int64 from a target's masks; pixels covered by no mask get ``ignore_index``.

    Crowd regions keep their class label: a crowd of cars is still car pixels. Crowd masks are
    painted first so that, where masks overlap (instance annotations), individual segments win;
    among the rest a later mask wins.
    """
    masks = to_numpy(masks).astype(bool)
    labels = to_numpy(labels).astype(np.int64)
    is_crowd = to_numpy(is_crowd).astype(bool)
    if masks.ndim != 3 or labels.shape != (len(masks),) or is_crowd.shape != (len(masks),):
        raise ValueError(
            f"expected masks (N, H, W) with labels and is_crowd (N,), got {masks.shape}, "
            f"{labels.shape} and {is_crowd.shape}"
        )
    label_map = np.full(masks.shape[1:], ignore_index, dtype=np.int64)
    painting_order = np.concatenate([np.flatnonzero(is_crowd), np.flatnonzero(~is_crowd)])
    for index in painting_order:
        label_map[masks[index]] = labels[index]
    return label_map


class SemanticEvaluator:
    """Accumulates a confusion matrix (rows = ground truth, columns = prediction) over images.

    Metrics follow detectron2's SemSegEvaluator: a class's IoU (and accuracy) is defined only when
    the class has at least one ground-truth pixel, and mIoU / mACC average over those classes only;
    classes that are predicted but absent from the ground truth do not enter the mean (their false
    positives still lower the IoU of the true classes of those pixels). Pixels whose ground truth is
    ``ignore_index`` are skipped entirely.
    """

    def __init__(self, num_classes: int, class_names: list[str], ignore_index: int = 255):
        if len(class_names) != num_classes:
            raise ValueError(f"got {len(class_names)} class_names for num_classes={num_classes}")
        self.num_classes = num_classes
        self.class_names = list(class_names)
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        self.confusion_matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        self.results: dict | None = None

    def process(
        self, pred_labels: np.ndarray | torch.Tensor, gt_labels: np.ndarray | torch.Tensor
    ) -> None:
        """Add one image: predicted and ground-truth label maps of the same shape."""
        pred = to_numpy(pred_labels).astype(np.int64)
        gt = to_numpy(gt_labels).astype(np.int64)
        if pred.shape != gt.shape:
            raise ValueError(f"pred_labels shape {pred.shape} != gt_labels shape {gt.shape}")
        valid = gt != self.ignore_index
        gt, pred = gt[valid], pred[valid]
        if gt.size and (gt.min() < 0 or gt.max() >= self.num_classes):
            raise ValueError(
                f"gt_labels must be in [0, {self.num_classes}) or {self.ignore_index}, "
                f"found values in [{gt.min()}, {gt.max()}]"
            )
        if pred.size and (pred.min() < 0 or pred.max() >= self.num_classes):
            raise ValueError(
                f"pred_labels must be in [0, {self.num_classes}), "
                f"found values in [{pred.min()}, {pred.max()}]"
            )
        self.confusion_matrix += np.bincount(
            gt * self.num_classes + pred, minlength=self.num_classes**2
        ).reshape(self.num_classes, self.num_classes)

    def state(self) -> np.ndarray:
        return self.confusion_matrix

    @staticmethod
    def merge_states(states: list[np.ndarray]) -> np.ndarray:
        return np.sum(states, axis=0)

    def compute(self, confusion_matrix: np.ndarray) -> dict:
        """Metrics (percent) from a confusion matrix; NaN per-class entries for absent classes."""
        if confusion_matrix.sum() == 0:
            raise ValueError("SemanticEvaluator: no valid ground-truth pixel was processed")
        true_positives = np.diag(confusion_matrix).astype(np.float64)
        gt_pixels = confusion_matrix.sum(axis=1).astype(np.float64)
        pred_pixels = confusion_matrix.sum(axis=0).astype(np.float64)
        union = gt_pixels + pred_pixels - true_positives

        present = gt_pixels > 0
        iou = np.full(self.num_classes, np.nan)
        accuracy = np.full(self.num_classes, np.nan)
        iou[present] = true_positives[present] / union[present]
        accuracy[present] = true_positives[present] / gt_pixels[present]
        frequency = gt_pixels / gt_pixels.sum()
        return {
            "mIoU": 100 * float(iou[present].mean()),
            "fwIoU": 100 * float((frequency[present] * iou[present]).sum()),
            "mACC": 100 * float(accuracy[present].mean()),
            "pACC": 100 * float(true_positives.sum() / gt_pixels.sum()),
            "per_class_iou": (100 * iou).tolist(),
            "per_class_acc": (100 * accuracy).tolist(),
            "confusion_matrix": confusion_matrix,
        }

    def evaluate(self) -> dict:
        """Metrics over the images processed on all ranks (same result on every rank)."""
        self.results = self.compute(self.merge_states(gather_objects(self.state())))
        return self.results

    def save(self, path_dir: str) -> None:
        """Write per_class.csv, confusion_matrix.npy and confusion_matrix.csv of the last evaluate.

        Confusion matrix rows are ground-truth classes, columns predicted classes.
        """
        if self.results is None:
            raise RuntimeError("SemanticEvaluator.save: call evaluate() first")
        os.makedirs(path_dir, exist_ok=True)
        with open(os.path.join(path_dir, "per_class.csv"), "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["class", "IoU", "ACC"])
            for name, iou, accuracy in zip(
                self.class_names, self.results["per_class_iou"], self.results["per_class_acc"]
            ):
                writer.writerow([name, f"{iou:.4f}", f"{accuracy:.4f}"])
        confusion_matrix = self.results["confusion_matrix"]
        np.save(os.path.join(path_dir, "confusion_matrix.npy"), confusion_matrix)
        with open(os.path.join(path_dir, "confusion_matrix.csv"), "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["gt \\ pred", *self.class_names])
            for name, row in zip(self.class_names, confusion_matrix):
                writer.writerow([name, *row.tolist()])
