"""Reader for datasets in the COCO panoptic format (JSON + segment-id PNGs)."""

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from eomt.data.bad_samples import BadSampleError, defer_or_raise
from eomt.data.files import DataPath, resolve_path
from eomt.data.images import load_image, open_image_file

__all__ = [
    "COCOPanopticDataset",
    "load_image",
    "load_json",
    "open_image_file",
    "read_panoptic_png",
    "require_keys",
]


def load_json(path: "str | Path | DataPath") -> dict:
    """Read a JSON annotation file, with errors that name the file."""
    path = resolve_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Annotation file not found: {path}")
    try:
        content = json.loads(path.read_bytes())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level")
    return content


def require_keys(entry: dict, keys: tuple[str, ...], where: str) -> None:
    """Raise a ValueError naming `where` if any of `keys` is missing from `entry`."""
    missing = [key for key in keys if key not in entry]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing} in {entry!r:.200}")


PANOPTIC_PNG_MODES = ("RGB", "RGBA", "P")


def read_panoptic_png(path: "str | Path | DataPath") -> np.ndarray:
    """Decode a COCO panoptic PNG into an int64 segment id map (id = R + 256 G + 256^2 B).

    RGB, RGBA (alpha ignored) and palette PNGs are read; other modes (a gray PNG) are refused.
    """
    with open_image_file(path, "Panoptic PNG") as png:
        if png.mode not in PANOPTIC_PNG_MODES:
            raise BadSampleError(
                f"{path}: a panoptic PNG must be RGB (id = R + 256 G + 256^2 B), got mode "
                f"{png.mode}",
                path,
            )
        rgb = np.asarray(png.convert("RGB"), dtype=np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]


def _ids_text(ids: list[int]) -> str:
    """'segment id 5' or 'segment ids 5, 7 (and 3 more)'."""
    if len(ids) == 1:
        return f"segment id {ids[0]}"
    more = f" (and {len(ids) - 3} more)" if len(ids) > 3 else ""
    return "segment ids " + ", ".join(map(str, ids[:3])) + more


class COCOPanopticDataset(Dataset):
    """COCO panoptic format: one mask per segment, labels contiguous in JSON category order.

    An image whose segments_info is empty is valid: empty masks (0, H, W) and labels (0,).
    Problems of one image raise BadSampleError (see `eomt.data.bad_samples`): with
    bad_samples="stop" those visible in the JSON (an unknown category id, an image without an
    annotation entry) already when the dataset is built, with "skip" when the image is read.
    """

    def __init__(
        self,
        image_dir: "str | Path | DataPath",
        json_file: "str | Path | DataPath",
        png_dir: "str | Path | DataPath",
        transforms: Callable | None = None,
        bad_samples: str = "stop",
    ):
        self.image_dir = resolve_path(image_dir)
        self.json_file = resolve_path(json_file)
        self.png_dir = resolve_path(png_dir)
        self.transforms = transforms
        self.categories_source = str(self.json_file)
        content = load_json(self.json_file)
        require_keys(content, ("images", "annotations", "categories"), str(self.json_file))

        self.categories = []
        for category in content["categories"]:
            require_keys(category, ("id", "name", "isthing", "color"), f"{self.json_file} category")
            self.categories.append(
                {
                    "id": category["id"],
                    "name": category["name"],
                    "isthing": int(category["isthing"]),
                    "color": list(category["color"]),
                }
            )
        self.label_of_category_id = {c["id"]: i for i, c in enumerate(self.categories)}

        annotation_of_image = {}
        for annotation in content["annotations"]:
            require_keys(
                annotation,
                ("image_id", "file_name", "segments_info"),
                f"{self.json_file} annotation",
            )
            for segment in annotation["segments_info"]:
                require_keys(segment, ("id", "category_id"), f"{self.json_file} segment")
            annotation_of_image[annotation["image_id"]] = annotation

        self.images, self.annotations, problems = [], [], {}
        for image in content["images"]:
            require_keys(image, ("id", "file_name"), f"{self.json_file} image")
            if not isinstance(image["id"], int):
                raise ValueError(f"{self.json_file}: image id {image['id']!r} is not an integer")
            index = len(self.images)
            self.images.append(image)
            annotation = annotation_of_image.get(image["id"])
            self.annotations.append(annotation)
            if annotation is None:
                problems[index] = BadSampleError(
                    f"{self.json_file}: image {image['id']} ({image['file_name']}) has no "
                    "annotation",
                    self.json_file,
                )
                continue
            for segment in annotation["segments_info"]:
                if segment["category_id"] not in self.label_of_category_id:
                    problems[index] = BadSampleError(
                        f"{self.json_file}: segment {segment['id']} of image {image['id']} "
                        f"({annotation['file_name']}) has unknown category id "
                        f"{segment['category_id']}",
                        self.json_file,
                    )
                    break
        self.bad_entries = defer_or_raise(problems, bad_samples)
        self.image_ids = [image["id"] for image in self.images]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        if index in self.bad_entries:
            raise self.bad_entries[index]
        image_info, annotation = self.images[index], self.annotations[index]
        png_path = self.png_dir / annotation["file_name"]
        segment_ids = read_panoptic_png(png_path)
        image = load_image(
            self.image_dir / image_info["file_name"], segment_ids.shape, str(png_path)
        )

        segments = annotation["segments_info"]
        listed = [segment["id"] for segment in segments]
        twice = sorted(i for i, count in Counter(listed).items() if count > 1)
        if twice:
            raise BadSampleError(
                f"{png_path}: {_ids_text(twice)} listed more than once in {self.json_file}",
                png_path,
            )
        present = set(np.unique(segment_ids).tolist()) - {0}
        absent = [i for i in listed if i not in present]
        if absent:
            raise BadSampleError(
                f"{png_path}: {_ids_text(absent)} from {self.json_file} absent from the PNG",
                png_path,
            )
        unlisted = sorted(present - set(listed))
        if unlisted:
            raise BadSampleError(
                f"{png_path}: {_ids_text(unlisted)} of the PNG not in its segments_info in "
                f"{self.json_file}",
                png_path,
            )

        masks = segment_ids[None] == np.asarray(listed, dtype=np.int64)[:, None, None]
        target = {
            "masks": torch.from_numpy(masks),
            "labels": torch.tensor(
                [self.label_of_category_id[s["category_id"]] for s in segments], dtype=torch.int64
            ),
            "is_crowd": torch.tensor(
                [bool(s.get("iscrowd", 0)) for s in segments], dtype=torch.bool
            ),
            "image_id": image_info["id"],
            "file_name": image_info["file_name"],
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target
