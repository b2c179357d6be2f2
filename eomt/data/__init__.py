"""Datasets in the shared (image, target) and (frames, target) conventions, the synthetic
generators and augmentation."""

from eomt.data.bad_samples import BadSampleError, BadSampleWarning
from eomt.data.categories import ade20k_categories, cityscapes_categories
from eomt.data.coco_instance import COCOInstanceDataset
from eomt.data.coco_panoptic import COCOPanopticDataset, load_image
from eomt.data.files import DataPath, resolve_path
from eomt.data.layouts import DATASET_LAYOUTS, check_dataset
from eomt.data.semantic import SemanticDataset
from eomt.data.synthetic import (
    SYNTHETIC_CATEGORIES,
    generate_synthetic_dataset,
    synthetic_split_paths,
)
from eomt.data.synthetic_video import generate_synthetic_videos, synthetic_video_paths
from eomt.data.transforms import TrainTransforms, collate, photometric_jitter
from eomt.data.video import (
    VSPW_CATEGORIES,
    ClipSampler,
    ClipTransforms,
    collate_clips,
)
from eomt.data.vipseg import VIPSegDataset
from eomt.data.vspw import VSPWDataset
from eomt.data.ytvis import YTVISDataset

__all__ = [
    "BadSampleError",
    "ClipSampler",
    "ClipTransforms",
    "BadSampleWarning",
    "COCOInstanceDataset",
    "COCOPanopticDataset",
    "DATASET_LAYOUTS",
    "DataPath",
    "SYNTHETIC_CATEGORIES",
    "SemanticDataset",
    "TrainTransforms",
    "VIPSegDataset",
    "VSPWDataset",
    "VSPW_CATEGORIES",
    "YTVISDataset",
    "ade20k_categories",
    "check_dataset",
    "cityscapes_categories",
    "collate",
    "collate_clips",
    "generate_synthetic_dataset",
    "generate_synthetic_videos",
    "load_image",
    "photometric_jitter",
    "resolve_path",
    "synthetic_split_paths",
    "synthetic_video_paths",
]
