"""Tiled prediction of large images: where tiles go, segments and instances stitched across
them, and the predictor over tiles."""

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eomt.config import get_cfg
from eomt.data.synthetic import SYNTHETIC_CATEGORIES
from eomt.deploy.predictor import Predictor
from eomt.deploy.tiling import (
    overlap_pixels,
    paste_cores,
    stitch_instances,
    stitch_panoptic,
    tile_grid,
    tile_starts,
)
from eomt.deploy.tiling_benchmark import GAP, panoptic_quality, paste_grid, val_scenes
from eomt.modeling import build_model
from eomt.weights.files import save_weights
from tools import benchmark_tiling


def test_tiles_cover_the_image_with_the_overlap_and_their_cores_split_it():
    assert tile_starts(100, 100, 20) == [0]
    assert tile_starts(60, 100, 20) == [0]  # smaller than a tile: one tile
    starts = tile_starts(1000, 256, 64)
    assert starts[0] == 0 and starts[-1] == 1000 - 256
    assert all(b - a <= 256 - 64 for a, b in zip(starts, starts[1:]))  # overlap >= 64
    tiles = tile_grid(300, 500, 128, 32)
    owner = np.zeros((300, 500), dtype=int)
    for tile in tiles:
        y0, x0, y1, x1 = tile.core
        assert tile.y0 <= y0 < y1 <= tile.y1 and tile.x0 <= x0 < x1 <= tile.x1
        owner[y0:y1, x0:x1] += 1
    assert (owner == 1).all()  # every pixel decided by exactly one tile
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(100, 64, 64)


def scene(height=90, width=130):
    """Ground truth: two stuff classes (sky above, grass below), things of two classes, one
    crossing every tile border."""
    truth = np.zeros((height, width), dtype=np.int32)
    truth[: height // 2] = 1  # sky (stuff, label 0)
    truth[height // 2 :] = 2  # grass (stuff, label 1)
    truth[30:60, 20:110] = 3  # a long car (label 2) across the vertical borders
    truth[5:80, 60:70] = 4  # a tall pole (label 3) across the horizontal border
    truth[70:85, 5:15] = 5  # a small car inside one tile
    labels = {1: (0, False), 2: (1, False), 3: (2, True), 4: (3, True), 5: (2, True)}
    return truth, labels


def tile_results(truth, labels, tiles, seed=0):
    """What each tile would predict: the ground truth in the tile, ids shuffled per tile."""
    generator = np.random.default_rng(seed)
    results = []
    for tile in tiles:
        crop = truth[tile.y0 : tile.y1, tile.x0 : tile.x1]
        present = [i for i in np.unique(crop) if i]
        new_ids = generator.permutation(len(present)) + 1
        mapping = np.zeros(truth.max() + 1, dtype=np.int32)
        mapping[present] = new_ids
        segments = [
            {"id": int(n), "label": labels[i][0], "isthing": labels[i][1], "score": 0.5 + 0.01 * t}
            for t, (i, n) in enumerate(zip(present, new_ids))
        ]
        results.append((torch.from_numpy(mapping[crop]), segments))
    return results


def test_stitched_segments_are_the_image_s_objects_across_tile_borders():
    truth, labels = scene()
    tiles = tile_grid(*truth.shape, 48, 16)
    assert len(tiles) > 4
    segmentation, segments = stitch_panoptic(
        tiles, tile_results(truth, labels, tiles), *truth.shape
    )
    assert len(segments) == 5 and [s["id"] for s in segments] == [1, 2, 3, 4, 5]
    # Each true object is exactly one stitched segment, of its class.
    for true_id, (label, isthing) in labels.items():
        ids = np.unique(segmentation.numpy()[truth == true_id])
        assert len(ids) == 1, true_id
        segment = segments[int(ids[0]) - 1]
        assert (segment["label"], segment["isthing"]) == (label, isthing)
        assert segment["area"] == int((truth == true_id).sum())


def test_one_tile_is_the_untiled_result():
    truth, labels = scene(40, 50)
    tiles = tile_grid(40, 50, 64, 16)
    assert len(tiles) == 1
    results = tile_results(truth, labels, tiles)
    segmentation, segments = stitch_panoptic(tiles, results, 40, 50)
    given_map, given = results[0]
    renumbered = {s["id"]: k + 1 for k, s in enumerate(sorted(given, key=lambda s: s["id"]))}
    assert torch.equal(segmentation, given_map.clone().apply_(lambda i: renumbered.get(i, 0)))
    assert [s["label"] for s in segments] == [
        s["label"] for s in sorted(given, key=lambda s: s["id"])
    ]


def test_stitched_instances_are_whole_and_not_repeated():
    truth, labels = scene()
    tiles = tile_grid(*truth.shape, 48, 16)
    results = []
    for tile in tiles:  # every tile finds the things it sees, cut at its edges
        crop = truth[tile.y0 : tile.y1, tile.x0 : tile.x1]
        things = [i for i in (3, 4, 5) if (crop == i).any()]
        masks = torch.from_numpy(np.stack([crop == i for i in things])) if things else None
        if masks is None:
            masks = torch.zeros(0, *crop.shape, dtype=torch.bool)
        scores = torch.tensor([0.9 - 0.1 * k for k in range(len(things))])
        results.append((masks, scores, torch.tensor([labels[i][0] for i in things])))
    instances = stitch_instances(tiles, results, topk=10)
    assert len(instances) == 3  # the long car, the pole and the small car, once each
    for instance in instances:
        y0, x0, y1, x1 = instance.box
        full = np.zeros(truth.shape, dtype=bool)
        full[y0:y1, x0:x1] = instance.mask.numpy()
        ids = np.unique(truth[full])
        assert len(ids) == 1 and (truth == ids[0]).sum() == full.sum()
        assert instance.label == labels[int(ids[0])][0]
    assert len(stitch_instances(tiles, results, topk=2)) == 2


def test_overlaps_in_pixels_or_as_a_fraction_of_the_tile():
    assert overlap_pixels(16, 64) == 16 and overlap_pixels(0.25, 64) == 16
    assert overlap_pixels(0, 64) == 0
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\), got 1.5"):
        overlap_pixels(1.5, 64)
    with pytest.raises(ValueError, match=r"overlap 64 must be in 0..63 pixels \(tile 64\)"):
        overlap_pixels(64, 64)


def test_semantic_labels_come_from_each_pixel_s_core():
    truth, _ = scene()
    tiles = tile_grid(*truth.shape, 48, 16)
    maps = [torch.from_numpy(truth[t.y0 : t.y1, t.x0 : t.x1]) for t in tiles]
    assert torch.equal(paste_cores(tiles, iter(maps), *truth.shape), torch.from_numpy(truth))
    # Each tile decides its core only: a tile wrong outside its core changes nothing.
    spoiled = []
    for tile, tile_map in zip(tiles, maps):
        tile_map = tile_map.clone()
        cy0, cx0, cy1, cx1 = tile.core
        outside = torch.ones_like(tile_map, dtype=torch.bool)
        outside[cy0 - tile.y0 : cy1 - tile.y0, cx0 - tile.x0 : cx1 - tile.x0] = False
        tile_map[outside] = 9
        spoiled.append(tile_map)
    assert torch.equal(paste_cores(tiles, spoiled, *truth.shape), torch.from_numpy(truth))


# -- the predictor over tiles, with a model that sees the ground truth -------------------------

ORACLE_CATEGORIES = [
    {"id": 1, "name": "car", "isthing": 1, "color": [200, 30, 30]},
    {"id": 2, "name": "pole", "isthing": 1, "color": [30, 30, 200]},
    {"id": 7, "name": "sky", "isthing": 0, "color": [120, 180, 250]},
    {"id": 8, "name": "grass", "isthing": 0, "color": [30, 160, 30]},
]
# The scene's segments (see `scene`) as ORACLE_CATEGORIES labels.
ORACLE_LABELS = {1: 2, 2: 3, 3: 0, 4: 1, 5: 0}


class Oracle(nn.Module):
    """A model of EoMT's outputs that reads the ground truth from the image: the blue channel
    holds each pixel's segment id / 8. Query k predicts segment k's mask (at 1/4 resolution, as
    EoMT) and class when the segment is in view, no object otherwise."""

    num_classes = len(ORACLE_CATEGORIES)

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))  # the predictor finds the device by it

    def forward(self, images):
        ids = (images[:, 2] * 8).round().long()
        queries = torch.arange(1, 9)
        masks = (ids[:, None] == queries[:, None, None]).float()
        mask_logits = 40 * (F.avg_pool2d(masks, 4) - 0.5)
        class_logits = torch.zeros(len(images), len(queries), self.num_classes + 1)
        for k, label in ORACLE_LABELS.items():
            class_logits[:, k - 1, label] = 20
        seen = masks.flatten(2).any(-1)
        class_logits[..., -1] = torch.where(seen, 0.0, 40.0)
        return [{"mask_logits": mask_logits, "class_logits": class_logits}]


def oracle_predictor(**tiling):
    cfg = get_cfg(overrides={"input.image_size": [48, 48], "model.num_classes": 4})
    return Predictor(Oracle(), cfg, ORACLE_CATEGORIES, device="cpu", **tiling)


def oracle_image(truth):
    image = torch.full((3, *truth.shape), 0.5)
    image[2] = torch.from_numpy(truth).float() / 8
    return image


def test_tiled_prediction_joins_things_across_tile_borders():
    """The scene (90 x 130) in tiles of 48 with 16 pixels of overlap, each tile predicted at
    full resolution: the long car crosses three vertical tile borders and the pole two horizontal
    ones, yet each thing is one segment, one instance, and no overlap repeats it."""
    truth, _ = scene()
    image = oracle_image(truth)
    tiled = oracle_predictor(tile=48, overlap=16)
    assert len(tile_grid(*truth.shape, 48, 16)) == 12  # 3 rows of 4
    seg, segments = tiled(image, "panoptic")
    assert seg.shape == truth.shape
    assert all(set(s) == {"id", "label", "category_id", "isthing", "score"} for s in segments)
    things = [s for s in segments if s["isthing"]]
    assert sorted(s["category_id"] for s in things) == [1, 1, 2]  # two cars, one pole
    for true_id in (3, 4, 5):
        ids, counts = np.unique(seg.numpy()[truth == true_id], return_counts=True)
        assert counts.max() > 0.9 * counts.sum(), true_id  # one segment covers the thing
        (segment,) = [s for s in segments if s["id"] == ids[counts.argmax()]]
        assert segment["label"] == ORACLE_LABELS[true_id] and segment["isthing"]
    stuff = sorted(s["category_id"] for s in segments if not s["isthing"])
    assert stuff == [7, 8]  # sky and grass, one segment each

    instances = tiled(image, "instance")
    assert set(instances) == {"boxes", "masks", "scores", "labels", "category_ids"}
    confident = (instances["scores"] > 0.5).nonzero().flatten().tolist()
    assert sorted(instances["category_ids"][confident].tolist()) == [1, 1, 2]
    for index in confident:
        x0, y0, x1, y1 = instances["boxes"][index].tolist()
        full = np.zeros(truth.shape, dtype=bool)
        full[y0:y1, x0:x1] = instances["masks"][index].numpy()
        ids, counts = np.unique(truth[full], return_counts=True)
        true_id = ids[counts.argmax()]
        assert true_id in (3, 4, 5) and counts.max() > 0.9 * (truth == true_id).sum()
        assert (full & (truth == true_id)).sum() > 0.9 * full.sum()

    labels = tiled(image, "semantic")
    true_labels = np.vectorize(ORACLE_LABELS.get)(truth)
    assert (labels.numpy() == true_labels).mean() > 0.95

    # Untiled, the same model sees the scene shrunk to 48 pixels: the pole is lost.
    _, shrunk = oracle_predictor()(image, "panoptic")
    assert sorted(s["category_id"] for s in shrunk if s["isthing"]) != [1, 1, 2]


# -- the measurement of tools/benchmark_tiling.py ---------------------------------------------


def test_the_grid_scene_pastes_images_and_ground_truth_alike(synthetic_root):
    scenes, categories = val_scenes(synthetic_root, 4)
    large = paste_grid(scenes, 2, categories)
    cell = max(s.image.shape[1] for s in scenes), max(s.image.shape[2] for s in scenes)
    assert large.image.shape == (3, 2 * cell[0], 2 * cell[1])
    by_id = {s["id"]: s for s in large.segments}
    assert len(by_id) == len(large.segments)
    for index, scene in enumerate(scenes):
        y, x = index // 2 * cell[0], index % 2 * cell[1]
        height, width = scene.image.shape[1:]
        assert torch.equal(large.image[:, y : y + height, x : x + width], scene.image)
        pasted = large.segmentation[y : y + height, x : x + width]
        assert ((pasted == 0) == (scene.segmentation == 0)).all()
        for segment in scene.segments:  # each segment keeps its pixels and class
            ids = np.unique(pasted[scene.segmentation == segment["id"]])
            assert len(ids) == 1 and by_id[int(ids[0])]["category_id"] == segment["category_id"]
    assert (large.image[:, large.segmentation == 0] == GAP).any()  # the gaps: grey and void

    # Things stay apart; the stuff of a class is one segment, as in one panoptic image.
    def kinds(segments):
        things = [s for s in segments if categories[s["category_id"]]["isthing"]]
        return [s for s in things if not s["iscrowd"]], [s for s in segments if s not in things]

    assert len(kinds(large.segments)[0]) == sum(len(kinds(s.segments)[0]) for s in scenes)
    stuff = [s["category_id"] for s in kinds(large.segments)[1]]
    assert len(stuff) == len(set(stuff))
    # The ground truth as a prediction scores 100.
    truth = [{"id": s["id"], "label": s["category_id"]} for s in large.segments]
    assert panoptic_quality([(large.segmentation, truth)], [large], categories)["PQ"] == 100


def test_benchmark_tiling_tool_reports_the_three_ways(tiny_cfg, synthetic_root, tmp_path, capsys):
    cfg = tiny_cfg()
    model = build_model(cfg)
    weights = save_weights(model, cfg, SYNTHETIC_CATEGORIES, tmp_path / "model.safetensors")
    argv = ["--weights", str(weights), "--data", str(synthetic_root), "--grid", "2"]
    rows = benchmark_tiling.main(benchmark_tiling.parse_args([*argv, "--device", "cpu"]))
    assert [row["prediction"] for row in rows] == ["each image alone", "tiled", "shrunk"]
    assert all(0 <= row[key] <= 100 for row in rows for key in ("PQ", "PQ_th", "PQ_st"))
    height, width, tiles = re.fullmatch(
        r"(\d+)x(\d+) in (\d+) tiles of 64, full resolution", rows[1]["the model sees"]
    ).groups()
    assert int(tiles) == len(tile_grid(int(height), int(width), 64, 16)) > 1
    out = capsys.readouterr().out
    assert out.startswith("| prediction | the model sees | PQ | PQ_th | PQ_st | seconds |")
