"""Reader for semantic segmentation datasets stored as an image folder and a label PNG folder."""

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from eomt.data.bad_samples import BadSampleError, MissingSampleFileError, defer_or_raise
from eomt.data.files import DataPath, resolve_path
from eomt.data.images import load_image, open_image_file


class SemanticDataset(Dataset):
    """Images `image_dir/<path><image_suffix>` with labels `label_dir/<path><label_suffix>`.

    Images are found in image_dir and its subfolders (folders or archives, see
    `eomt.data.files`); `image_suffix` may be a tuple of endings, matched in lower case. A label
    pixel value v means contiguous class v - label_offset; values equal to ignore_index or
    outside 0..C-1 after the offset are ignored. Alternatively, `label_lut[v]` gives the class
    of value v (255: ignored). One mask per class present, none crowd. `image_id` is the index
    in the sorted image list. The label map defines the geometry (see `load_image`); an image
    whose pixels are all ignored is valid (empty masks (0, H, W), labels (0,)).

    Problems of one image raise BadSampleError (see `eomt.data.bad_samples`): a missing label
    file already when the dataset is built with bad_samples="stop", when the image is read with
    "skip"; when the image is read, a multi-channel label PNG, a value outside label_lut, a size
    mismatch, or with `known_values` (the values the dataset's label PNGs may hold) any other
    value: an unknown category. `categories_source` says where the class list comes from.
    """

    def __init__(
        self,
        image_dir: "str | Path | DataPath",
        label_dir: "str | Path | DataPath",
        categories: list[dict],
        ignore_index: int = 255,
        label_offset: int = 0,
        image_suffix: str | tuple[str, ...] = ".jpg",
        label_suffix: str = ".png",
        transforms: Callable | None = None,
        label_lut: Sequence[int] | None = None,
        known_values: Sequence[int] | None = None,
        bad_samples: str = "stop",
        categories_source: str = "",
    ):
        self.image_dir = resolve_path(image_dir)
        self.label_dir = resolve_path(label_dir)
        self.categories = categories
        self.categories_source = categories_source or "the class list of this layout"
        self.ignore_index = ignore_index
        self.label_offset = label_offset
        self.transforms = transforms
        self.label_lut = None
        if label_lut is not None:
            if label_offset != 0:
                raise ValueError("give either label_offset or label_lut, not both")
            self.label_lut = np.asarray(label_lut, dtype=np.int64)
            valid = (self.label_lut == 255) | (
                (self.label_lut >= 0) & (self.label_lut < len(categories))
            )
            if self.label_lut.ndim != 1 or not valid.all():
                raise ValueError(
                    f"label_lut must be a list of class indices 0..{len(categories) - 1} or 255"
                )
        self.known_values = None
        if known_values is not None:
            values = sorted({int(v) for v in known_values})
            if not values or values[0] < 0:
                raise ValueError(f"known_values must be non-negative ints, got {known_values}")
            self.known_values = np.zeros(values[-1] + 1, dtype=bool)
            self.known_values[values] = True
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"Image folder not found: {self.image_dir}")
        if isinstance(image_suffix, str):
            image_names = self.image_dir.files(image_suffix)
            stems = [name[: -len(image_suffix)] for name in image_names]
        else:
            image_names = [
                name for name in self.image_dir.files() if name.lower().endswith(image_suffix)
            ]
            stems = [name.rsplit(".", 1)[0] for name in image_names]
        if not image_names:
            endings = image_suffix if isinstance(image_suffix, str) else "|".join(image_suffix)
            raise FileNotFoundError(f"No *{endings} images in {self.image_dir}")
        self.image_paths = [self.image_dir / name for name in image_names]
        self.label_paths = [self.label_dir / (stem + label_suffix) for stem in stems]
        if not self.label_dir.is_dir():
            raise FileNotFoundError(f"Label folder not found: {self.label_dir}")
        problems = {
            index: MissingSampleFileError(f"Label file not found: {label_path}", label_path)
            for index, label_path in enumerate(self.label_paths)
            if not label_path.is_file()
        }
        self.bad_entries = defer_or_raise(problems, bad_samples)
        self.image_ids = list(range(len(self.image_paths)))

    def __len__(self) -> int:
        return len(self.image_paths)

    def read_label_map(self, index: int) -> np.ndarray:
        """Contiguous int64 label map (H, W) of one image, 255 where ignored."""
        label_path = self.label_paths[index]
        with open_image_file(label_path, "Label file") as png:
            raw = np.asarray(png, dtype=np.int64)
            mode = png.mode
        if raw.ndim != 2:
            raise BadSampleError(
                f"{label_path}: expected a single-channel label PNG, got mode {mode}", label_path
            )
        if self.known_values is not None:
            inside = (raw >= 0) & (raw < len(self.known_values))
            known = inside.copy()
            known[inside] = self.known_values[raw[inside]]
            if not known.all():
                raise BadSampleError(
                    f"{label_path}: unknown category: label value {raw[~known][0]} is not one of "
                    f"this dataset's ({_ranges(np.flatnonzero(self.known_values).tolist())})",
                    label_path,
                )
        if self.label_lut is not None:
            outside = (raw < 0) | (raw >= len(self.label_lut))
            if outside.any():
                raise BadSampleError(
                    f"{label_path}: label value {raw[outside][0]} is outside the label table "
                    f"(0..{len(self.label_lut) - 1})",
                    label_path,
                )
            return self.label_lut[raw]
        labels = raw - self.label_offset
        ignored = (raw == self.ignore_index) | (labels < 0) | (labels >= len(self.categories))
        labels[ignored] = 255
        return labels

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        if index in self.bad_entries:
            raise self.bad_entries[index]
        label_map = self.read_label_map(index)
        image = load_image(self.image_paths[index], label_map.shape, str(self.label_paths[index]))
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


def _ranges(values: list[int]) -> str:
    """Sorted ints as '0..33, 255'."""
    parts, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[i - 1] + 1:
            first, last = values[start], values[i - 1]
            parts.append(str(first) if first == last else f"{first}..{last}")
            start = i
    return ", ".join(parts)
