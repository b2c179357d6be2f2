"""Reader for datasets in the COCO instance format (polygon or RLE segmentations)."""

import contextlib
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from eomt.data.categories import distinct_color
from eomt.data.coco_panoptic import load_image, load_json, require_keys
from eomt.data.files import DataPath, resolve_path


class COCOInstanceDataset(Dataset):
    """COCO instance format: one mask per annotation, crowd annotations flagged in `is_crowd`.

    All categories of an instance JSON are things; labels are contiguous in JSON order.
    """

    def __init__(
        self,
        image_dir: "str | Path | DataPath",
        json_file: "str | Path | DataPath",
        transforms: Callable | None = None,
    ):
        self.image_dir = resolve_path(image_dir)
        self.json_file = resolve_path(json_file)
        self.transforms = transforms
        content = load_json(self.json_file)
        require_keys(content, ("images", "annotations", "categories"), str(self.json_file))
        for image in content["images"]:
            require_keys(image, ("id", "file_name", "height", "width"), f"{self.json_file} image")
        for category in content["categories"]:
            require_keys(category, ("id", "name"), f"{self.json_file} category")
        for annotation in content["annotations"]:
            require_keys(
                annotation,
                ("id", "image_id", "category_id", "segmentation"),
                f"{self.json_file} annotation",
            )

        self.categories = [
            {
                "id": category["id"],
                "name": category["name"],
                "isthing": 1,
                "color": list(category.get("color", distinct_color(index))),
            }
            for index, category in enumerate(content["categories"])
        ]
        self.label_of_category_id = {c["id"]: i for i, c in enumerate(self.categories)}
        image_ids = {image["id"] for image in content["images"]}
        for annotation in content["annotations"]:
            if annotation["category_id"] not in self.label_of_category_id:
                raise ValueError(
                    f"{self.json_file}: annotation {annotation['id']} has unknown category id "
                    f"{annotation['category_id']}"
                )
            if annotation["image_id"] not in image_ids:
                raise ValueError(
                    f"{self.json_file}: annotation {annotation['id']} refers to unknown image id "
                    f"{annotation['image_id']}"
                )

        self.coco = COCO()
        self.coco.dataset = content
        with contextlib.redirect_stdout(io.StringIO()):  # silence pycocotools' progress prints
            self.coco.createIndex()
        self.image_ids = [image["id"] for image in content["images"]]

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        image_info = self.coco.imgs[self.image_ids[index]]
        image = load_image(self.image_dir / image_info["file_name"])
        height, width = image.shape[1:]
        if (image_info["height"], image_info["width"]) != (height, width):
            raise ValueError(
                f"{self.json_file}: image {image_info['id']} is {image_info['height']}x"
                f"{image_info['width']} in the JSON but {height}x{width} in "
                f"{self.image_dir / image_info['file_name']}"
            )

        annotations = self.coco.imgToAnns[image_info["id"]]
        masks = np.zeros((len(annotations), height, width), dtype=bool)
        for i, annotation in enumerate(annotations):
            masks[i] = self.coco.annToMask(annotation).astype(bool)
        target = {
            "masks": torch.from_numpy(masks),
            "labels": torch.tensor(
                [self.label_of_category_id[a["category_id"]] for a in annotations],
                dtype=torch.int64,
            ),
            "is_crowd": torch.tensor(
                [bool(a.get("iscrowd", 0)) for a in annotations], dtype=torch.bool
            ),
            "image_id": image_info["id"],
            "file_name": image_info["file_name"],
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target
