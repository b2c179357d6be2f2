"""The COCO panoptic format: segment-id PNGs plus one JSON that describes their segments.

A PNG stores segment id ``R + 256 G + 256^2 B`` per pixel, 0 being void. The JSON holds one
annotation per image, ``{"image_id", "file_name", "segments_info"}``; in a prediction (result)
file a segment is ``{"id", "category_id"}`` with the dataset's category id, in ground truth it
also has ``iscrowd`` (and usually ``area`` and ``bbox``). By convention the PNGs of ``name.json``
lie in the folder ``name/``.
"""

import functools
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

MAX_SEGMENT_ID = 256**3 - 1
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EIGHT_BIT_RGB = (b"\x08\x02", b"\x08\x06")  # (bit depth, colour type): RGB, RGBA


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 colours -> (H, W) uint32 segment ids."""
    ids = rgb[..., 0].astype(np.uint32)
    ids |= rgb[..., 1].astype(np.uint32) << 8
    ids |= rgb[..., 2].astype(np.uint32) << 16
    return ids


def id_to_rgb(segment_map: np.ndarray) -> np.ndarray:
    """(H, W) segment ids in [0, 256^3) -> (H, W, 3) uint8 colours."""
    segment_map = np.asarray(segment_map, dtype=np.int64)
    if segment_map.size and (segment_map.min() < 0 or segment_map.max() > MAX_SEGMENT_ID):
        raise ValueError(
            f"segment ids must lie in [0, {MAX_SEGMENT_ID}] to fit a PNG, found "
            f"[{segment_map.min()}, {segment_map.max()}]"
        )
    channels = [segment_map % 256, segment_map // 256 % 256, segment_map // 256**2]
    return np.stack(channels, axis=-1).astype(np.uint8)


@functools.cache
def libspng():
    """The pyspng module where it is installed (not on the GPU machine), else None."""
    try:
        import pyspng
    except ImportError:
        return None
    return pyspng


def read_panoptic_png(path: str | Path) -> np.ndarray:
    """Segment ids (H, W) uint32 of a panoptic PNG (its first three channels, as the COCO API).

    8-bit RGB(A) PNGs are decoded by libspng (pyspng) where installed, twice as fast as
    Pillow, which decodes the same pixels where it is not.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"panoptic PNG not found: {path}")
    data = Path(path).read_bytes()
    spng = libspng()
    # IHDR, the first chunk, gives the bit depth (byte 24) and colour type (byte 25).
    eight_bit_rgb = data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    if spng is not None and eight_bit_rgb and data[24:26] in EIGHT_BIT_RGB:
        # As RGBA a pixel is 4 bytes whose low three, read as a little-endian uint32, are its
        # id: no per-channel temporaries.
        try:
            ids = spng.load(data, "RGBA").view("<u4")[..., 0]
        except RuntimeError as error:
            raise ValueError(f"{path}: {error}") from error
        ids &= 0xFFFFFF
        return ids
    try:
        with Image.open(io.BytesIO(data)) as png:
            rgb = np.asarray(png)
    except OSError as error:  # a truncated or corrupt file
        raise ValueError(f"{path}: {error}") from error
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"{path}: expected an RGB panoptic PNG, got an array of shape {rgb.shape}")
    return rgb_to_id(rgb[..., :3])


def write_panoptic_png(path: str | Path, segment_map: np.ndarray) -> None:
    Image.fromarray(id_to_rgb(segment_map)).save(path)


def prediction_annotation(
    image_id: int | str, file_name: str, segments: list[dict], categories: list[dict]
) -> dict:
    """Result-format annotation of one image; contiguous labels become dataset category ids."""
    return {
        "image_id": image_id,
        "file_name": file_name,
        "segments_info": [
            {"id": int(segment["id"]), "category_id": categories[segment["category_id"]]["id"]}
            for segment in segments
        ],
    }


def write_panoptic_json(path: str | Path, annotations: list[dict]) -> None:
    """A COCO panoptic result file: ``{"annotations": [...]}`` sorted by image id."""
    with open(path, "w") as file:
        json.dump({"annotations": sorted(annotations, key=lambda a: a["image_id"])}, file)


def _require(mapping: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [key for key in keys if key not in mapping]
    if missing:
        raise ValueError(f"{where} lacks the key(s) {missing}")


def load_panoptic_json(path: str | Path, ground_truth: bool) -> dict:
    """A COCO panoptic JSON, checked for the keys the evaluation reads.

    Ground truth needs ``categories`` (``id``, ``name``, ``isthing``) and ``iscrowd`` on every
    segment; predictions need only ``annotations``.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"panoptic JSON not found: {path}")
    with open(path) as file:
        try:
            data = json.load(file)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with 'annotations'")
    _require(data, ("annotations", "categories") if ground_truth else ("annotations",), str(path))
    if ground_truth:
        for index, category in enumerate(data["categories"]):
            _require(category, ("id", "name", "isthing"), f"{path}: categories[{index}]")
    segment_keys = ("id", "category_id", "iscrowd") if ground_truth else ("id", "category_id")
    for index, annotation in enumerate(data["annotations"]):
        where = f"{path}: annotations[{index}]"
        _require(annotation, ("image_id", "file_name", "segments_info"), where)
        for segment in annotation["segments_info"]:
            _require(segment, segment_keys, f"{where} (image {annotation['image_id']}): a segment")
    return data
