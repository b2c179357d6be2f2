"""Datasets in the shared (image, target) convention, the synthetic generator and augmentation."""

from eomt.data.coco_instance import COCOInstanceDataset
from eomt.data.coco_panoptic import COCOPanopticDataset, load_image
from eomt.data.semantic import SemanticDataset
from eomt.data.synthetic import (
    SYNTHETIC_CATEGORIES,
    generate_synthetic_dataset,
    synthetic_split_paths,
)
from eomt.data.transforms import TrainTransforms, collate, photometric_jitter

__all__ = [
    "COCOInstanceDataset",
    "COCOPanopticDataset",
    "SYNTHETIC_CATEGORIES",
    "SemanticDataset",
    "TrainTransforms",
    "collate",
    "generate_synthetic_dataset",
    "load_image",
    "photometric_jitter",
    "synthetic_split_paths",
]
