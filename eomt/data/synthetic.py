"""Seeded synthetic panoptic dataset: textured stuff regions overlaid with occluding shapes.

Written in the COCO panoptic format, with a COCO instance JSON and semantic label PNGs derived
from the same segments, so that the readers for the real datasets serve it unchanged.
"""

import colorsys
import json
import math
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_util

# Bump whenever the generated content changes, so that stale copies are regenerated.
GENERATOR_VERSION = 1

# Contiguous order: things first, then stuff. Category ids are deliberately not contiguous.
SYNTHETIC_CATEGORIES = [
    {"id": 1, "name": "disc", "isthing": 1, "color": [220, 20, 60]},
    {"id": 2, "name": "rectangle", "isthing": 1, "color": [255, 140, 0]},
    {"id": 3, "name": "triangle", "isthing": 1, "color": [138, 43, 226]},
    {"id": 4, "name": "star", "isthing": 1, "color": [255, 20, 147]},
    {"id": 10, "name": "grass", "isthing": 0, "color": [60, 160, 60]},
    {"id": 11, "name": "water", "isthing": 0, "color": [40, 90, 200]},
    {"id": 12, "name": "sand", "isthing": 0, "color": [210, 180, 120]},
]
THING_CATEGORIES = [c for c in SYNTHETIC_CATEGORIES if c["isthing"]]
STUFF_CATEGORIES = [c for c in SYNTHETIC_CATEGORIES if not c["isthing"]]
THING_IDS = {c["id"] for c in THING_CATEGORIES}

# Hue ranges in degrees (may wrap past 360); neighbouring classes are close in hue on purpose,
# so that shape has to disambiguate them.
THING_HUE_RANGES = {
    "disc": (350, 380),
    "rectangle": (25, 50),
    "triangle": (265, 295),
    "star": (300, 330),
}
THING_HUE_RANGES_BY_ID = {c["id"]: THING_HUE_RANGES[c["name"]] for c in THING_CATEGORIES}
STUFF_HUE_RANGES = {"grass": (90, 140), "water": (195, 225), "sand": (30, 50)}

IMAGE_SIZE_RANGE = (128, 192)  # width and height, each drawn independently
NUM_THINGS_RANGE = (2, 7)
MIN_THING_SIZE = 10
MAX_THING_SIZE_FRACTION = 0.5  # of the shorter image side
MIN_VISIBLE_PIXELS = 40
CROWD_PROBABILITY = 0.03
JPEG_QUALITY = 95
SPLIT_NAMES = ("train", "val")
MARKER_FILE = "synthetic_complete.json"


def synthetic_split_paths(root: str | Path, split: str) -> dict[str, Path]:
    """Paths of one split of a synthetic dataset, named after the reader arguments."""
    root = Path(root)
    return {
        "image_dir": root / "images" / split,
        "panoptic_json": root / "annotations" / f"panoptic_{split}.json",
        "panoptic_png_dir": root / "annotations" / f"panoptic_{split}",
        "instance_json": root / "annotations" / f"instances_{split}.json",
        "semantic_dir": root / "annotations" / f"semantic_{split}",
    }


def generate_synthetic_dataset(
    output_dir: str | Path, num_train: int = 800, num_val: int = 100, seed: int = 0
) -> bool:
    """Write the dataset under output_dir; return False if an identical one is already there.

    A marker file holding the parameters is written last, so an interrupted run is redone.
    """
    return write_splits_once(
        output_dir, MARKER_FILE, GENERATOR_VERSION, (num_train, num_val), seed, _write_split
    )


def write_splits_once(
    output_dir: str | Path,
    marker_name: str,
    version: int,
    counts: tuple[int, int],
    seed: int,
    write_split,
    stale_folders: tuple[str, ...] = (),
) -> bool:
    """`write_split(output_dir, split, count, seed)` for the train and val splits, unless the
    marker file says the same parameters were written (then False). The marker is written
    last, so an interrupted run is redone; `stale_folders` of an earlier, different generation
    are removed first, so that no stale file outlives it."""
    num_train, num_val = counts
    if num_train < 0 or num_val < 0:
        raise ValueError(f"num_train and num_val must be >= 0, got {num_train} and {num_val}")
    output_dir = Path(output_dir)
    params = {"generator_version": version, "num_train": num_train, "num_val": num_val}
    params["seed"] = seed
    marker = output_dir / marker_name
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return False
    marker.unlink(missing_ok=True)
    for name in stale_folders:
        shutil.rmtree(output_dir / name, ignore_errors=True)
    for split, count in zip(SPLIT_NAMES, counts):
        write_split(output_dir, split, count, seed)
    marker.write_text(json.dumps(params, indent=2) + "\n")
    return True


def _write_split(output_dir: Path, split: str, num_images: int, seed: int) -> None:
    paths = synthetic_split_paths(output_dir, split)
    # Remove a previous, different generation so that no stale files outlive it.
    for directory in ("image_dir", "panoptic_png_dir", "semantic_dir"):
        shutil.rmtree(paths[directory], ignore_errors=True)
        paths[directory].mkdir(parents=True)

    contiguous_label = {c["id"]: i for i, c in enumerate(SYNTHETIC_CATEGORIES)}
    images, panoptic_annotations, instance_annotations = [], [], []
    split_index = SPLIT_NAMES.index(split)
    for image_index in range(num_images):
        # One independent stream per (seed, split, image): splits never share random draws.
        rng = np.random.default_rng([seed, split_index, image_index])
        image, segment_ids, segments = render_sample(rng)
        image_id = image_index + 1
        stem = f"{image_id:06d}"
        height, width = segment_ids.shape
        images.append(
            {"id": image_id, "file_name": f"{stem}.jpg", "width": width, "height": height}
        )
        Image.fromarray(image).save(paths["image_dir"] / f"{stem}.jpg", quality=JPEG_QUALITY)
        Image.fromarray(_ids_to_rgb(segment_ids)).save(paths["panoptic_png_dir"] / f"{stem}.png")

        semantic = np.full((height, width), 255, dtype=np.uint8)
        segments_info = []
        for segment in segments:
            mask = segment_ids == segment["id"]
            semantic[mask] = contiguous_label[segment["category_id"]]
            segments_info.append({**segment, "area": int(mask.sum()), "bbox": _mask_bbox(mask)})
            if segment["category_id"] in THING_IDS:
                rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
                instance_annotations.append(
                    {
                        "id": len(instance_annotations) + 1,
                        "image_id": image_id,
                        "category_id": segment["category_id"],
                        "segmentation": {
                            "size": rle["size"],
                            "counts": rle["counts"].decode("ascii"),
                        },
                        "area": int(mask_util.area(rle)),
                        "bbox": [float(v) for v in mask_util.toBbox(rle)],
                        "iscrowd": segment["iscrowd"],
                    }
                )
        Image.fromarray(semantic).save(paths["semantic_dir"] / f"{stem}.png")
        panoptic_annotations.append(
            {"image_id": image_id, "file_name": f"{stem}.png", "segments_info": segments_info}
        )

    info = {"description": f"EoMT synthetic shapes, {split} split", "version": GENERATOR_VERSION}
    panoptic_categories = [
        {**c, "supercategory": "shape" if c["isthing"] else "ground"} for c in SYNTHETIC_CATEGORIES
    ]
    instance_categories = [
        {"id": c["id"], "name": c["name"], "supercategory": "shape"} for c in THING_CATEGORIES
    ]
    _write_json(
        paths["panoptic_json"],
        {
            "info": info,
            "images": images,
            "annotations": panoptic_annotations,
            "categories": panoptic_categories,
        },
    )
    _write_json(
        paths["instance_json"],
        {
            "info": info,
            "images": images,
            "annotations": instance_annotations,
            "categories": instance_categories,
        },
    )


def render_sample(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Draw one image.

    Returns the uint8 RGB image (H, W, 3), the panoptic segment id map (H, W) and the segments
    [{id, category_id, iscrowd}] in panoptic order: things (bottom to top), then stuff.
    """
    width, height = (int(v) for v in rng.integers(*IMAGE_SIZE_RANGE, endpoint=True, size=2))
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)

    stuff_region, stuff_classes = _stuff_layout(rng, xs, ys)
    image = np.zeros((height, width, 3), dtype=np.float32)
    for region_index, stuff_index in enumerate(stuff_classes):
        texture = _stuff_texture(rng, STUFF_CATEGORIES[stuff_index]["name"], xs, ys)
        image[stuff_region == region_index] = texture[stuff_region == region_index]

    # Painter's order: later shapes occlude earlier ones. Shapes left with too few visible pixels
    # are dropped and the rest repainted; dropping only uncovers pixels, so one pass suffices.
    shapes = [_random_shape_mask(rng, width, height) for _ in range(_num_things(rng))]
    visible = _paint_order(shapes, height, width)
    survivors = [
        shape for i, shape in enumerate(shapes) if (visible == i + 1).sum() >= MIN_VISIBLE_PIXELS
    ]
    visible = _paint_order(survivors, height, width)

    segment_ids = np.zeros((height, width), dtype=np.int64)
    segments = []
    for i, (category_id, _) in enumerate(survivors):
        mask = visible == i + 1
        image[mask] = _thing_texture(rng, category_id, xs, ys, mask)[mask]
        segment_id = category_id * 1000 + i + 1
        segment_ids[mask] = segment_id
        iscrowd = int(rng.random() < CROWD_PROBABILITY)
        segments.append({"id": segment_id, "category_id": category_id, "iscrowd": iscrowd})
    for region_index, stuff_index in enumerate(stuff_classes):
        mask = (stuff_region == region_index) & (visible == 0)
        if mask.any():  # things may cover a whole stuff region
            category_id = STUFF_CATEGORIES[stuff_index]["id"]
            segment_ids[mask] = category_id * 1000
            segments.append({"id": category_id * 1000, "category_id": category_id, "iscrowd": 0})

    image = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
    return image, segment_ids, segments


def _num_things(rng: np.random.Generator) -> int:
    return int(rng.integers(NUM_THINGS_RANGE[0], NUM_THINGS_RANGE[1], endpoint=True))


def _stuff_layout(
    rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Split the image into 2-3 bands along a random direction with wavy boundaries.

    Returns the region index map and, per region, the index into STUFF_CATEGORIES.
    """
    num_regions = int(rng.choice([2, 3], p=[0.5, 0.5]))
    stuff_classes = rng.permutation(len(STUFF_CATEGORIES))[:num_regions]
    angle = rng.uniform(0, 2 * math.pi)
    along = xs * math.cos(angle) + ys * math.sin(angle)
    across = -xs * math.sin(angle) + ys * math.cos(angle)
    field = along.copy()
    for _ in range(3):
        amplitude = rng.uniform(3, 12)
        wavelength = rng.uniform(25, 120)
        field += amplitude * np.sin(2 * math.pi * across / wavelength + rng.uniform(0, 2 * math.pi))
    field += rng.normal(0, 0.6, size=field.shape)  # ragged edges
    if num_regions == 2:
        quantiles = [rng.uniform(0.3, 0.7)]
    else:
        quantiles = [rng.uniform(0.2, 0.4), rng.uniform(0.6, 0.8)]
    thresholds = np.quantile(field, quantiles)
    return np.searchsorted(thresholds, field), stuff_classes


def _hsv_color(rng: np.random.Generator, hue_range, saturation_range, value_range) -> np.ndarray:
    hue = (rng.uniform(*hue_range) % 360) / 360
    return np.array(
        colorsys.hsv_to_rgb(hue, rng.uniform(*saturation_range), rng.uniform(*value_range)),
        dtype=np.float32,
    )


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid upsampled bilinearly."""
    coarse = rng.uniform(-1, 1, size=(cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR))


def _stuff_texture(rng: np.random.Generator, name: str, xs: np.ndarray, ys: np.ndarray):
    """Whole-image texture (H, W, 3) in [0, 1]-ish floats; each stuff class has its own kind."""
    height, width = xs.shape
    hue_range = STUFF_HUE_RANGES[name]
    if name == "grass":  # blotchy noise
        base = _hsv_color(rng, hue_range, (0.35, 0.6), (0.35, 0.6))
        shade = 1 + 0.25 * _smooth_noise(rng, height, width, cells=int(rng.integers(4, 9)))
        noise_std = 0.06
    elif name == "water":  # stripes
        base = _hsv_color(rng, hue_range, (0.35, 0.65), (0.45, 0.7))
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(6, 14)
        phase = 2 * math.pi * (xs * math.cos(angle) + ys * math.sin(angle)) / period
        shade = 1 + 0.2 * np.sin(phase + rng.uniform(0, 2 * math.pi))
        noise_std = 0.04
    else:  # sand: linear gradient
        base = _hsv_color(rng, hue_range, (0.2, 0.4), (0.6, 0.85))
        angle = rng.uniform(0, 2 * math.pi)
        ramp = xs * math.cos(angle) + ys * math.sin(angle)
        ramp = 2 * (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1.0) - 1
        shade = 1 + rng.uniform(0.1, 0.25) * ramp
        noise_std = 0.05
    noise = rng.normal(0, noise_std, size=(height, width, 3)).astype(np.float32)
    return base * shade[..., None] + noise


def _thing_texture(rng: np.random.Generator, category_id: int, xs, ys, mask: np.ndarray):
    """Saturated colour from the class hue range, shaded across the object, with pixel noise."""
    height, width = mask.shape
    base = _hsv_color(rng, THING_HUE_RANGES_BY_ID[category_id], (0.6, 0.95), (0.55, 0.95))
    angle = rng.uniform(0, 2 * math.pi)
    ramp = xs * math.cos(angle) + ys * math.sin(angle)
    inside = ramp[mask]
    ramp = (ramp - inside.min()) / max(float(inside.max() - inside.min()), 1.0) - 0.5
    shade = 1 + rng.uniform(0.1, 0.3) * ramp
    noise = rng.normal(0, 0.05, size=(height, width, 3)).astype(np.float32)
    return base * shade[..., None] + noise


def _random_shape_mask(rng: np.random.Generator, width: int, height: int):
    """A random thing: (category_id, full bool mask (H, W) before occlusion)."""
    category = THING_CATEGORIES[int(rng.integers(len(THING_CATEGORIES)))]
    max_size = MAX_THING_SIZE_FRACTION * min(width, height)
    radius = 0.5 * math.exp(rng.uniform(math.log(MIN_THING_SIZE), math.log(max_size)))
    center = np.array([rng.uniform(0, width), rng.uniform(0, height)])
    rotation = rng.uniform(0, 2 * math.pi)
    outline = shape_outline(rng, category["name"], radius)
    return category["id"], polygon_mask(place_outline(outline, center, rotation), width, height)


def shape_outline(rng: np.random.Generator, name: str, radius: float) -> np.ndarray:
    """The vertices (2, K) of a thing class's shape around the origin, of about `radius`."""
    if name == "disc":
        angles = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        radii = np.stack([np.full(48, radius), np.full(48, radius * rng.uniform(0.6, 1.0))])
        return np.stack([np.cos(angles), np.sin(angles)]) * radii
    if name == "rectangle":
        half_width, half_height = radius, radius * rng.uniform(0.45, 1.0)
        return np.array([[-1, 1, 1, -1], [-1, -1, 1, 1]]) * [[half_width], [half_height]]
    if name == "triangle":
        angles = math.pi / 2 + np.array([0, 2, 4]) * math.pi / 3 + rng.uniform(-0.25, 0.25, 3)
        radii = radius * rng.uniform(0.85, 1.0, 3)
        return np.stack([np.cos(angles), np.sin(angles)]) * radii
    # five-pointed star: alternating outer and inner vertices
    angles = np.arange(10) * math.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, radius, radius * rng.uniform(0.38, 0.5))
    return np.stack([np.cos(angles), np.sin(angles)]) * radii


def place_outline(outline: np.ndarray, center, rotation: float, scale: float = 1.0) -> np.ndarray:
    """The outline's vertices rotated by `rotation` (radians), scaled, moved to `center`."""
    cos, sin = math.cos(rotation), math.sin(rotation)
    return scale * (np.array([[cos, -sin], [sin, cos]]) @ outline) + np.asarray(center)[:, None]


def polygon_mask(points: np.ndarray, width: int, height: int) -> np.ndarray:
    """The bool mask (H, W) of the polygon with vertices `points` (2, K), clipped to the image."""
    canvas = Image.new("1", (width, height), 0)
    ImageDraw.Draw(canvas).polygon([(float(x), float(y)) for x, y in points.T], fill=1)
    return np.asarray(canvas, dtype=bool)


def _paint_order(shapes: list[tuple[int, np.ndarray]], height: int, width: int) -> np.ndarray:
    """Map (H, W) of the topmost shape at each pixel: 1-based index into shapes, 0 = none."""
    visible = np.zeros((height, width), dtype=np.int64)
    for i, (_, mask) in enumerate(shapes):
        visible[mask] = i + 1
    return visible


def _ids_to_rgb(segment_ids: np.ndarray) -> np.ndarray:
    """COCO panoptic PNG encoding: id = R + 256 * G + 256^2 * B."""
    return np.stack(
        [segment_ids % 256, segment_ids // 256 % 256, segment_ids // 256**2], axis=-1
    ).astype(np.uint8)


def _mask_bbox(mask: np.ndarray) -> list[int]:
    """[x, y, width, height] of the mask's bounding box."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def _write_json(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))
