"""Reader for datasets in the COCO panoptic format (JSON + segment-id PNGs)."""

import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as F

from eomt.data.files import DataPath, resolve_path


def open_image_file(path: "str | Path | DataPath", what: str = "Image file") -> Image.Image:
    """Open an image from a folder or an archive; a missing file raises naming `what` and path."""
    path = resolve_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return Image.open(io.BytesIO(path.read_bytes()))


def load_image(path: "str | Path | DataPath") -> torch.Tensor:
    """Read an image as a float32 RGB tensor (3, H, W) in [0, 1], EXIF orientation applied."""
    with open_image_file(path) as pil_image:
        rgb = ImageOps.exif_transpose(pil_image).convert("RGB")
    return F.to_dtype(F.to_image(rgb), torch.float32, scale=True)


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


def read_panoptic_png(path: "str | Path | DataPath") -> np.ndarray:
    """Decode a COCO panoptic PNG into an int64 segment id map (id = R + 256 G + 256^2 B)."""
    with open_image_file(path, "Panoptic PNG") as png:
        rgb = np.asarray(png.convert("RGB"), dtype=np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]


class COCOPanopticDataset(Dataset):
    """COCO panoptic format: one mask per segment, labels contiguous in JSON category order."""

    def __init__(
        self,
        image_dir: "str | Path | DataPath",
        json_file: "str | Path | DataPath",
        png_dir: "str | Path | DataPath",
        transforms: Callable | None = None,
    ):
        self.image_dir = resolve_path(image_dir)
        self.json_file = resolve_path(json_file)
        self.png_dir = resolve_path(png_dir)
        self.transforms = transforms
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
                if segment["category_id"] not in self.label_of_category_id:
                    raise ValueError(
                        f"{self.json_file}: segment {segment['id']} of image "
                        f"{annotation['image_id']} has unknown category id {segment['category_id']}"
                    )
            annotation_of_image[annotation["image_id"]] = annotation

        self.images = []
        for image in content["images"]:
            require_keys(image, ("id", "file_name"), f"{self.json_file} image")
            if not isinstance(image["id"], int):
                raise ValueError(f"{self.json_file}: image id {image['id']!r} is not an integer")
            if image["id"] not in annotation_of_image:
                raise ValueError(f"{self.json_file}: image {image['id']} has no annotation")
            self.images.append(image)
        self.annotations = [annotation_of_image[image["id"]] for image in self.images]
        self.image_ids = [image["id"] for image in self.images]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        image_info, annotation = self.images[index], self.annotations[index]
        image = load_image(self.image_dir / image_info["file_name"])
        png_path = self.png_dir / annotation["file_name"]
        segment_ids = read_panoptic_png(png_path)
        if segment_ids.shape != tuple(image.shape[1:]):
            raise ValueError(
                f"{png_path}: size {segment_ids.shape} differs from its image "
                f"{tuple(image.shape[1:])}"
            )

        segments = annotation["segments_info"]
        masks = np.zeros((len(segments), *segment_ids.shape), dtype=bool)
        for i, segment in enumerate(segments):
            masks[i] = segment_ids == segment["id"]
            if not masks[i].any():
                raise ValueError(f"{png_path}: segment id {segment['id']} from the JSON is absent")
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
