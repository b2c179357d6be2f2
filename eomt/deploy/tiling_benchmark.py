"""Tiled prediction measured (`tools/benchmark_tiling.py`, docs/serving.md): a large image
pasted from a grid of the synthetic val images, their objects at the dataset's own scale and
the ground truth pasted alike, and its PQ predicted three ways: each image alone (as the
evaluation predicts it), the large image in tiles at full resolution, and the large image in
one pass, shrunk to the model's input.
"""

import time
from dataclasses import dataclass

import numpy as np
import torch

from eomt.data import load_image, synthetic_split_paths
from eomt.deploy.predictor import Predictor
from eomt.deploy.tiling import overlap_pixels, tile_grid
from eomt.evaluation.panoptic import PanopticEvaluator
from eomt.evaluation.panoptic_io import load_panoptic_json, read_panoptic_png

GAP = 0.5  # the grey between pasted images, void in the ground truth


@dataclass
class Scene:
    """An image and its panoptic ground truth (contiguous labels, as the evaluator takes it)."""

    image: torch.Tensor  # float (3, H, W) in [0, 1]
    segmentation: np.ndarray  # int32 (H, W) segment ids, 0 void
    segments: list[dict]  # {"id", "category_id" (a label), "iscrowd"}


def val_scenes(root, count: int) -> tuple[list[Scene], list[dict]]:
    """The first `count` val images of the synthetic dataset at `root`, with its categories."""
    paths = synthetic_split_paths(root, "val")
    content = load_panoptic_json(paths["panoptic_json"], ground_truth=True)
    if len(content["annotations"]) < count:
        raise ValueError(
            f"{paths['panoptic_json']} has {len(content['annotations'])} images, {count} needed"
        )
    label_of = {category["id"]: i for i, category in enumerate(content["categories"])}
    files = {image["id"]: image["file_name"] for image in content["images"]}
    scenes = []
    for annotation in content["annotations"][:count]:
        png = read_panoptic_png(paths["panoptic_png_dir"] / annotation["file_name"])
        segments = [
            {"id": s["id"], "category_id": label_of[s["category_id"]], "iscrowd": s["iscrowd"]}
            for s in annotation["segments_info"]
        ]
        image = load_image(paths["image_dir"] / files[annotation["image_id"]])
        scenes.append(Scene(image, png.astype(np.int32), segments))
    return scenes, content["categories"]


def paste_grid(scenes: list[Scene], columns: int, categories: list[dict]) -> Scene:
    """The scenes row by row in cells of the largest one's size, each at the top left of its
    cell, the rest grey and void. As in one COCO panoptic image, the stuff of a class is one
    segment, and so are the crowd regions of a class."""
    cell_height = max(scene.image.shape[1] for scene in scenes)
    cell_width = max(scene.image.shape[2] for scene in scenes)
    rows = -(-len(scenes) // columns)
    image = torch.full((3, rows * cell_height, columns * cell_width), GAP)
    segmentation = np.zeros(image.shape[1:], dtype=np.int32)
    segments, merged = [], {}
    for index, scene in enumerate(scenes):
        y, x = index // columns * cell_height, index % columns * cell_width
        height, width = scene.image.shape[1:]
        image[:, y : y + height, x : x + width] = scene.image
        new_ids = {}
        for segment in scene.segments:
            label, crowd = segment["category_id"], segment["iscrowd"]
            joined = crowd or not categories[label]["isthing"]
            key = (label, crowd)
            if joined and key in merged:
                new_ids[segment["id"]] = merged[key]
                continue
            segments.append({"id": len(segments) + 1, "category_id": label, "iscrowd": crowd})
            new_ids[segment["id"]] = len(segments)
            if joined:
                merged[key] = len(segments)
        ids, inverse = np.unique(scene.segmentation, return_inverse=True)
        lookup = np.array([new_ids.get(int(i), 0) for i in ids], dtype=np.int32)
        segmentation[y : y + height, x : x + width] = lookup[inverse.reshape(height, width)]
    return Scene(image, segmentation, segments)


def panoptic_quality(results: list, scenes: list[Scene], categories: list[dict]) -> dict:
    """PQ, PQ of things and of stuff (percent) of predictor results against the scenes."""
    evaluator = PanopticEvaluator(categories, workers=0)
    for (segmentation, segments), scene in zip(results, scenes):
        predicted = [{"id": s["id"], "category_id": s["label"]} for s in segments]
        evaluator.process(segmentation, predicted, scene.segmentation, scene.segments)
    metrics = evaluator.evaluate()
    return {key: round(metrics[key], 1) for key in ("PQ", "PQ_th", "PQ_st")}


def compare_tiling(
    model, cfg, categories, root, grid: int = 6, tile: int | None = None, overlap=0.25, device=None
) -> list[dict]:
    """One row per way of predicting the `grid` x `grid` large image of `root`'s val images:
    what the model sees, PQ / PQ things / PQ stuff, forwards and seconds. `tile`: default the
    model's input size; `overlap` in pixels or as a fraction of the tile."""
    scenes, dataset_categories = val_scenes(root, grid * grid)
    names = [category["name"] for category in dataset_categories]
    if [category["name"] for category in categories] != names:
        raise ValueError(f"the model's classes are not those of {root}: {names}")
    large = paste_grid(scenes, grid, dataset_categories)
    height, width = large.image.shape[1:]
    size = tuple(cfg.input.image_size)
    tile = tile or min(size)
    tiles = len(tile_grid(height, width, tile, overlap_pixels(overlap, tile)))
    untiled = Predictor(model, cfg, categories, device)
    tiled = Predictor(model, cfg, categories, device, tile=tile, overlap=overlap)
    runs = [
        (
            "each image alone",
            f"{len(scenes)} images, each resized to fit {size[0]}x{size[1]}",
            untiled,
            scenes,
        ),  # fmt: skip
        ("tiled", f"{height}x{width} in {tiles} tiles of {tile}, full resolution", tiled, [large]),
        ("shrunk", f"{height}x{width} resized to fit {size[0]}x{size[1]}", untiled, [large]),
    ]
    rows = []
    for name, sees, predictor, truths in runs:
        start = time.perf_counter()
        results = [predictor(scene.image, "panoptic") for scene in truths]
        seconds = time.perf_counter() - start
        rows.append(
            {
                "prediction": name,
                "the model sees": sees,
                **panoptic_quality(results, truths, dataset_categories),
                "seconds": round(seconds, 1),
            }
        )
    return rows
