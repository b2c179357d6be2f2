"""Reader for semantic segmentation datasets stored as an image folder and a label PNG folder."""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from eomt.data.coco_panoptic import load_image


class SemanticDataset(Dataset):
    """Images `image_dir/<stem><image_suffix>` with labels `label_dir/<stem><label_suffix>`.

    A label pixel value v means contiguous class v - label_offset; values equal to ignore_index or
    outside 0..C-1 after the offset are ignored. One mask per class present, none crowd.
    `image_id` is the index in the sorted image list.
    """

    def __init__(
        self,
        image_dir: str | Path,
        label_dir: str | Path,
        categories: list[dict],
        ignore_index: int = 255,
        label_offset: int = 0,
        image_suffix: str = ".jpg",
        label_suffix: str = ".png",
        transforms: Callable | None = None,
    ):
        self.image_dir = Path(image_dir)
        self.label_dir = Path(label_dir)
        self.categories = categories
        self.ignore_index = ignore_index
        self.label_offset = label_offset
        self.transforms = transforms
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"Image folder not found: {self.image_dir}")
        self.image_paths = sorted(self.image_dir.glob(f"*{image_suffix}"))
        if not self.image_paths:
            raise FileNotFoundError(f"No *{image_suffix} images in {self.image_dir}")
        self.label_paths = [self.label_dir / f"{p.stem}{label_suffix}" for p in self.image_paths]
        for label_path in self.label_paths:
            if not label_path.is_file():
                raise FileNotFoundError(f"Label file not found: {label_path}")
        self.image_ids = list(range(len(self.image_paths)))

    def __len__(self) -> int:
        return len(self.image_paths)

    def read_label_map(self, index: int) -> np.ndarray:
        """Contiguous int64 label map (H, W) of one image, 255 where ignored."""
        label_path = self.label_paths[index]
        with Image.open(label_path) as png:
            raw = np.asarray(png, dtype=np.int64)
        if raw.ndim != 2:
            raise ValueError(f"{label_path}: expected a single-channel label PNG, got {png.mode}")
        labels = raw - self.label_offset
        ignored = (raw == self.ignore_index) | (labels < 0) | (labels >= len(self.categories))
        labels[ignored] = 255
        return labels

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        image = load_image(self.image_paths[index])
        label_map = self.read_label_map(index)
        if label_map.shape != tuple(image.shape[1:]):
            raise ValueError(
                f"{self.label_paths[index]}: size {label_map.shape} differs from its image "
                f"{tuple(image.shape[1:])}"
            )
        classes = np.unique(label_map[label_map != 255])
        target = {
            "masks": torch.from_numpy(label_map[None] == classes[:, None, None]),
            "labels": torch.from_numpy(classes),
            "is_crowd": torch.zeros(len(classes), dtype=torch.bool),
            "image_id": self.image_ids[index],
            "file_name": self.image_paths[index].name,
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target
