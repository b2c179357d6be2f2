"""Seeded synthetic videos: textured stuff backgrounds with shapes that move, rotate, scale,
occlude each other and enter and leave the frame, each keeping its identity.

Written in three formats from the same render, so that the readers for the real datasets
serve it unchanged: YouTube-VIS (JSON with compressed RLE, `null` where a track is absent;
JPEG frames), VIPSeg (per-frame panoptic PNGs + JSON) and VSPW (per-frame label PNGs holding
category id + 1). Classes are those of the image generator (`SYNTHETIC_CATEGORIES`).
"""

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from eomt.data.synthetic import (
    IMAGE_SIZE_RANGE,
    JPEG_QUALITY,
    MIN_THING_SIZE,
    SPLIT_NAMES,
    STUFF_CATEGORIES,
    SYNTHETIC_CATEGORIES,
    THING_CATEGORIES,
    _ids_to_rgb,
    _mask_bbox,
    _paint_order,
    _stuff_layout,
    _stuff_texture,
    _thing_texture,
    _write_json,
    place_outline,
    polygon_mask,
    shape_outline,
    write_splits_once,
)

# Bump whenever the generated content changes, so that stale copies are regenerated.
GENERATOR_VERSION = 1

NUM_FRAMES_RANGE = (8, 24)
NUM_TRACKS_RANGE = (2, 5)
MAX_TRACK_SIZE_FRACTION = 0.35  # of the shorter side, the largest radius
SPEED_RANGE = (0.5, 4.0)  # pixels per frame
MAX_TURN = 0.12  # radians per frame
MAX_GROWTH = 0.015  # log scale per frame
LATE_OR_EARLY_PROBABILITY = 0.3  # a track appears after the first or vanishes before the last
FRAME_NOISE = 0.02
FORMATS = ("ytvis", "vipseg", "vspw")
MARKER_FILE = "synthetic_video_complete.json"


def synthetic_video_paths(root: str | Path, split: str) -> dict[str, dict[str, Path]]:
    """Paths of one split, per format, named after the readers' arguments:
    `YTVISDataset(**paths["ytvis"])`, `VIPSegDataset(**paths["vipseg"])`,
    `VSPWDataset(**paths["vspw"], categories=SYNTHETIC_CATEGORIES)`."""
    root = Path(root)
    return {
        "ytvis": {
            "image_dir": root / "ytvis" / split / "JPEGImages",
            "json_file": root / "ytvis" / f"{split}.json",
        },
        "vipseg": {
            "image_dir": root / "vipseg" / "images",
            "json_file": root / "vipseg" / f"panoptic_gt_{split}.json",
            "png_dir": root / "vipseg" / "panomasksRGB",
        },
        "vspw": {
            "data_dir": root / "vspw" / "data",
            "split_file": root / "vspw" / f"{split}.txt",
        },
    }


def generate_synthetic_videos(
    output_dir: str | Path, num_train: int = 16, num_val: int = 4, seed: int = 0
) -> bool:
    """Write the videos under output_dir; return False if identical ones are already there.

    A marker file holding the parameters is written last, so an interrupted run is redone.
    """
    return write_splits_once(
        output_dir,
        MARKER_FILE,
        GENERATOR_VERSION,
        (num_train, num_val),
        seed,
        _write_split,
        stale_folders=FORMATS,
    )


def render_video(rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray, list[dict]]:
    """Draw one video.

    Returns the uint8 RGB frames [(H, W, 3)] * T, the panoptic segment id maps (T, H, W) and
    the segments [{id, category_id, isthing}]: the things (bottom to top; id = category id *
    1000 + track number, the same in every frame) that are visible in at least one frame, then
    the stuff (id = category id * 1000).
    """
    width, height = (int(v) for v in rng.integers(*IMAGE_SIZE_RANGE, endpoint=True, size=2))
    num_frames = int(rng.integers(*NUM_FRAMES_RANGE, endpoint=True))
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)

    stuff_region, stuff_classes = _stuff_layout(rng, xs, ys)
    background = np.zeros((height, width, 3), dtype=np.float32)
    for region_index, stuff_index in enumerate(stuff_classes):
        texture = _stuff_texture(rng, STUFF_CATEGORIES[stuff_index]["name"], xs, ys)
        background[stuff_region == region_index] = texture[stuff_region == region_index]

    num_tracks = int(rng.integers(NUM_TRACKS_RANGE[0], NUM_TRACKS_RANGE[1], endpoint=True))
    tracks = [_random_track(rng, width, height, num_frames) for _ in range(num_tracks)]

    frames, visible_maps = [], []
    for t in range(num_frames):
        shapes = [(track["category_id"], _track_mask(track, t, width, height)) for track in tracks]
        visible = _paint_order(shapes, height, width)
        image = background + rng.normal(0, FRAME_NOISE, size=background.shape).astype(np.float32)
        for i, track in enumerate(tracks):
            mask = visible == i + 1
            if mask.any():
                # The same texture stream every frame: a track keeps its colour and shading.
                texture_rng = np.random.default_rng(track["texture_seed"])
                image[mask] = _thing_texture(texture_rng, track["category_id"], xs, ys, mask)[mask]
        frames.append(np.clip(np.rint(image * 255), 0, 255).astype(np.uint8))
        visible_maps.append(visible)
    visible = np.stack(visible_maps)

    segment_ids = np.zeros((num_frames, height, width), dtype=np.int64)
    segments = []
    for i, track in enumerate(tracks):
        mask = visible == i + 1
        if mask.any():  # a track hidden or outside the frame throughout is left out
            segment_id = track["category_id"] * 1000 + i + 1
            segment_ids[mask] = segment_id
            segments.append({"id": segment_id, "category_id": track["category_id"], "isthing": 1})
    for region_index, stuff_index in enumerate(stuff_classes):
        mask = (stuff_region == region_index)[None] & (visible == 0)
        if mask.any():
            category_id = STUFF_CATEGORIES[stuff_index]["id"]
            segment_ids[mask] = category_id * 1000
            segments.append({"id": category_id * 1000, "category_id": category_id, "isthing": 0})
    return frames, segment_ids, segments


def _random_track(rng: np.random.Generator, width: int, height: int, num_frames: int) -> dict:
    """A shape and its motion: it is at `center` mid-video, moves at constant velocity, turns
    and scales at constant rates, and exists in frames start..end-1."""
    category = THING_CATEGORIES[int(rng.integers(len(THING_CATEGORIES)))]
    max_size = 2 * MAX_TRACK_SIZE_FRACTION * min(width, height)
    radius = 0.5 * math.exp(rng.uniform(math.log(MIN_THING_SIZE), math.log(max_size)))
    outline = shape_outline(rng, category["name"], radius)
    center = np.array([rng.uniform(0.15, 0.85) * width, rng.uniform(0.15, 0.85) * height])
    direction = rng.uniform(0, 2 * math.pi)
    velocity = rng.uniform(*SPEED_RANGE) * np.array([math.cos(direction), math.sin(direction)])
    start, end = 0, num_frames
    if rng.random() < LATE_OR_EARLY_PROBABILITY:
        start = int(rng.integers(1, num_frames // 2))
    if rng.random() < LATE_OR_EARLY_PROBABILITY:
        end = int(rng.integers(max(start + 2, num_frames // 2), num_frames))
    return {
        "category_id": category["id"],
        "outline": outline,
        "center": center,
        "velocity": velocity,
        "rotation": rng.uniform(0, 2 * math.pi),
        "turn": rng.uniform(-MAX_TURN, MAX_TURN),
        "growth": rng.uniform(-MAX_GROWTH, MAX_GROWTH),
        "start": start,
        "end": end,
        "middle": (num_frames - 1) / 2,
        "texture_seed": int(rng.integers(2**63)),
    }


def _track_mask(track: dict, t: int, width: int, height: int) -> np.ndarray:
    """The track's full mask (H, W) in frame t, before occlusion; empty outside its life."""
    if not track["start"] <= t < track["end"]:
        return np.zeros((height, width), dtype=bool)
    dt = t - track["middle"]
    points = place_outline(
        track["outline"],
        track["center"] + dt * track["velocity"],
        track["rotation"] + dt * track["turn"],
        math.exp(dt * track["growth"]),
    )
    return polygon_mask(points, width, height)


def _write_split(output_dir: Path, split: str, num_videos: int, seed: int) -> None:
    paths = synthetic_video_paths(output_dir, split)
    ytvis_videos, ytvis_tracks, vipseg_videos, vipseg_annotations, vspw_names = [], [], [], [], []
    split_index = SPLIT_NAMES.index(split)
    for video_index in range(num_videos):
        # One independent stream per (seed, split, video): splits never share random draws.
        rng = np.random.default_rng([seed, split_index, video_index, 1])
        frames, segment_ids, segments = render_video(rng)
        num_frames, height, width = segment_ids.shape
        name = f"{split}_{video_index + 1:04d}"
        stems = [f"{t:05d}" for t in range(num_frames)]
        folders = {
            "ytvis": paths["ytvis"]["image_dir"] / name,
            "vipseg": paths["vipseg"]["image_dir"] / name,
            "vipseg_png": paths["vipseg"]["png_dir"] / name,
            "vspw": paths["vspw"]["data_dir"] / name / "origin",
            "vspw_mask": paths["vspw"]["data_dir"] / name / "mask",
        }
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)

        frame_annotations = []
        for t, (frame, stem) in enumerate(zip(frames, stems)):
            buffer = io.BytesIO()
            Image.fromarray(frame).save(buffer, format="JPEG", quality=JPEG_QUALITY)
            for key in ("ytvis", "vipseg", "vspw"):
                (folders[key] / f"{stem}.jpg").write_bytes(buffer.getvalue())
            Image.fromarray(_ids_to_rgb(segment_ids[t])).save(folders["vipseg_png"] / f"{stem}.png")
            semantic = np.zeros((height, width), dtype=np.uint8)
            segments_info = []
            for segment in segments:
                mask = segment_ids[t] == segment["id"]
                if mask.any():
                    semantic[mask] = segment["category_id"] + 1
                    segments_info.append(
                        {
                            "id": segment["id"],
                            "category_id": segment["category_id"],
                            "iscrowd": 0,
                            "area": int(mask.sum()),
                            "bbox": _mask_bbox(mask),
                        }
                    )
            Image.fromarray(semantic).save(folders["vspw_mask"] / f"{stem}.png")
            frame_annotations.append(
                {"image_id": stem, "file_name": f"{stem}.png", "segments_info": segments_info}
            )

        video_id = video_index + 1
        ytvis_videos.append(
            {
                "id": video_id,
                "file_names": [f"{name}/{stem}.jpg" for stem in stems],
                "height": height,
                "width": width,
                "length": num_frames,
            }
        )
        for segment in segments:
            if segment["isthing"]:
                ytvis_tracks.append(
                    _ytvis_track(len(ytvis_tracks) + 1, video_id, segment, segment_ids)
                )
        vipseg_videos.append(
            {
                "video_id": name,
                "images": [
                    {"id": stem, "file_name": f"{stem}.jpg", "height": height, "width": width}
                    for stem in stems
                ],
            }
        )
        vipseg_annotations.append({"video_id": name, "annotations": frame_annotations})
        vspw_names.append(name)

    info = {"description": f"EoMT synthetic videos, {split} split", "version": GENERATOR_VERSION}
    _write_json(
        paths["ytvis"]["json_file"],
        {
            "info": info,
            "videos": ytvis_videos,
            "annotations": ytvis_tracks,
            "categories": [
                {"id": c["id"], "name": c["name"], "supercategory": "shape"}
                for c in THING_CATEGORIES
            ],
        },
    )
    _write_json(
        paths["vipseg"]["json_file"],
        {
            "info": info,
            "videos": vipseg_videos,
            "annotations": vipseg_annotations,
            "categories": SYNTHETIC_CATEGORIES,
        },
    )
    paths["vspw"]["split_file"].parent.mkdir(parents=True, exist_ok=True)
    paths["vspw"]["split_file"].write_text("".join(f"{name}\n" for name in vspw_names))


def _ytvis_track(track_id: int, video_id: int, segment: dict, segment_ids: np.ndarray) -> dict:
    """A YouTube-VIS annotation: per frame a compressed RLE, its area and box, or null."""
    num_frames, height, width = segment_ids.shape
    segmentations, areas, bboxes = [], [], []
    for t in range(num_frames):
        mask = segment_ids[t] == segment["id"]
        if not mask.any():
            segmentations.append(None)
            areas.append(None)
            bboxes.append(None)
            continue
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        segmentations.append({"size": [height, width], "counts": rle["counts"].decode("ascii")})
        areas.append(int(mask.sum()))
        bboxes.append([float(v) for v in mask_util.toBbox(rle)])
    return {
        "id": track_id,
        "video_id": video_id,
        "category_id": segment["category_id"],
        "iscrowd": 0,
        "height": height,
        "width": width,
        "length": num_frames,
        "segmentations": segmentations,
        "areas": areas,
        "bboxes": bboxes,
    }
