"""Reader for datasets in the COCO instance format (polygon or RLE segmentations)."""

import contextlib
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from eomt.data.bad_samples import BadSampleError, defer_or_raise
from eomt.data.categories import distinct_color
from eomt.data.coco_panoptic import load_image, load_json, require_keys
from eomt.data.files import DataPath, resolve_path


def rle_runs(counts: str) -> list[int]:
    """The run lengths of a COCO compressed RLE string (pycocotools' format: per run, 5-bit
    groups as characters from '0', low group first, 0x20 = more groups follow, the last group's
    0x10 = negative; from the fourth run on, the value is relative to the run two before).
    ValueError if the string is malformed. pycocotools decodes malformed strings unchecked."""
    runs, position = [], 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if position == len(counts):
                raise ValueError("the string ends inside a run")
            code = ord(counts[position]) - 48
            if not 0 <= code < 64:
                raise ValueError(f"character {counts[position]!r} is not an RLE digit")
            value |= (code & 0x1F) << shift
            more = bool(code & 0x20)
            position, shift = position + 1, shift + 5
            if not more and code & 0x10:
                value -= 1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def decode_segmentation(
    segmentation, height: int, width: int, where: str, path=None
) -> np.ndarray | None:
    """The bool mask (H, W) of a COCO segmentation: polygons, or an RLE with compressed
    (string) or uncompressed (list) counts. None if its polygons are all degenerate (fewer than
    3 points). A malformed segmentation or an RLE of another size raises BadSampleError whose
    message starts with `where`; `path` is the file at fault."""
    if isinstance(segmentation, list):
        polygons = []
        for polygon in segmentation:
            if (
                not isinstance(polygon, list)
                or len(polygon) % 2
                or not all(isinstance(v, (int, float)) for v in polygon)
            ):
                raise BadSampleError(
                    f"{where}: a polygon must be a list of x, y numbers, got {polygon!r:.80}",
                    path,
                )
            if len(polygon) >= 6:
                polygons.append([float(v) for v in polygon])
        if not polygons:
            return None
        rle = mask_util.merge(mask_util.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and {"counts", "size"} <= segmentation.keys():
        if list(segmentation["size"]) != [height, width]:
            raise BadSampleError(
                f"{where}: RLE size {list(segmentation['size'])} differs from the image size "
                f"[{height}, {width}] in the JSON",
                path,
            )
        counts = segmentation["counts"]
        try:
            runs = rle_runs(counts) if isinstance(counts, str) else [int(c) for c in counts]
        except (TypeError, ValueError) as error:
            raise BadSampleError(f"{where}: malformed RLE counts ({error})", path) from error
        if min(runs, default=0) < 0 or sum(runs) != height * width:
            raise BadSampleError(
                f"{where}: RLE runs cover {sum(runs)} pixels, not the image's "
                f"{height} x {width} = {height * width}",
                path,
            )
        rle = segmentation
        if not isinstance(counts, str):  # uncompressed RLE
            rle = mask_util.frPyObjects(segmentation, height, width)
    else:
        raise BadSampleError(
            f"{where}: segmentation must be polygons or an RLE with counts and size, got "
            f"{segmentation!r:.80}",
            path,
        )
    try:
        return mask_util.decode(rle).astype(bool)
    except Exception as error:  # a malformed RLE string
        raise BadSampleError(f"{where}: cannot decode its RLE ({error})", path) from error


class COCOInstanceDataset(Dataset):
    """COCO instance format: one mask per annotation, crowd annotations flagged in `is_crowd`.

    All categories of an instance JSON are things; labels are contiguous in JSON order. The
    JSON's height and width of an image define its geometry (see `load_image`). Polygons of
    fewer than 3 points have no area and are ignored, and an annotation left with none is left
    out; an image without annotations is valid (empty masks (0, H, W), labels (0,)). Problems
    of one image raise BadSampleError (see `eomt.data.bad_samples`): an unknown category id
    already when the dataset is built with bad_samples="stop", when the image is read with
    "skip"; a malformed segmentation or a size mismatch when the image is read.
    """

    def __init__(
        self,
        image_dir: "str | Path | DataPath",
        json_file: "str | Path | DataPath",
        transforms: Callable | None = None,
        bad_samples: str = "stop",
    ):
        self.image_dir = resolve_path(image_dir)
        self.json_file = resolve_path(json_file)
        self.transforms = transforms
        self.categories_source = str(self.json_file)
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
        index_of_image = {image["id"]: i for i, image in enumerate(content["images"])}
        problems = {}
        for annotation in content["annotations"]:
            if annotation["image_id"] not in index_of_image:
                raise ValueError(
                    f"{self.json_file}: annotation {annotation['id']} refers to unknown image id "
                    f"{annotation['image_id']}"
                )
            if annotation["category_id"] not in self.label_of_category_id:
                index = index_of_image[annotation["image_id"]]
                problems.setdefault(
                    index,
                    BadSampleError(
                        f"{self.json_file}: annotation {annotation['id']} of image "
                        f"{annotation['image_id']} has unknown category id "
                        f"{annotation['category_id']}",
                        self.json_file,
                    ),
                )
        self.bad_entries = defer_or_raise(problems, bad_samples)

        self.coco = COCO()
        self.coco.dataset = content
        with contextlib.redirect_stdout(io.StringIO()):  # silence pycocotools' progress prints
            self.coco.createIndex()
        self.image_ids = [image["id"] for image in content["images"]]

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        if index in self.bad_entries:
            raise self.bad_entries[index]
        image_info = self.coco.imgs[self.image_ids[index]]
        height, width = image_info["height"], image_info["width"]
        image = load_image(
            self.image_dir / image_info["file_name"],
            (height, width),
            f"{self.json_file}, image {image_info['id']}",
        )

        annotations, masks = [], []
        for annotation in self.coco.imgToAnns[image_info["id"]]:
            mask = self._mask(annotation, height, width)
            if mask is not None:
                annotations.append(annotation)
                masks.append(mask)
        target = {
            "masks": torch.from_numpy(
                np.stack(masks) if masks else np.zeros((0, height, width), bool)
            ),
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

    def _mask(self, annotation: dict, height: int, width: int) -> np.ndarray | None:
        """The bool mask (H, W) of an annotation; None if its polygons are all degenerate."""
        where = f"{self.json_file}: annotation {annotation['id']} of image {annotation['image_id']}"
        return decode_segmentation(annotation["segmentation"], height, width, where, self.json_file)
