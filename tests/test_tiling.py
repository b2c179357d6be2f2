"""Tiled prediction of large images: where tiles go, and panoptic segments stitched across them."""

import numpy as np
import pytest
import torch

from eomt.deploy.tiling import stitch_instances, stitch_panoptic, tile_grid, tile_starts


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
