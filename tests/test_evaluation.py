import contextlib
import csv
import io
import json
import math
import os
from collections import Counter

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from eomt.evaluation import (
    InstanceEvaluator,
    PanopticEvaluator,
    SemanticEvaluator,
    masks_to_panoptic,
    masks_to_semantic,
    panoptic_io,
)
from eomt.evaluation.instance import COCO_STATS
from eomt.evaluation.panoptic_io import id_to_rgb, read_panoptic_png, write_panoptic_png
from eomt.pictures import draw_panoptic, side_by_side, upscale_factor

CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1, "color": [220, 20, 60]},
    {"id": 3, "name": "car", "isthing": 1, "color": [0, 0, 142]},
    {"id": 17, "name": "sky", "isthing": 0, "color": [70, 130, 180]},
]
PERSON, CAR, SKY = 0, 1, 2


def segment(segment_id, category, iscrowd=0):
    isthing = CATEGORIES[category]["isthing"]
    return {"id": segment_id, "category_id": category, "iscrowd": iscrowd, "isthing": isthing}


# ----------------------------------------------------------------------------- panoptic


def test_pq_perfect_prediction_is_100():
    gt = np.zeros((4, 4), dtype=np.int32)
    gt[:2] = 1
    gt[2:, :2] = 2
    segments = [segment(1, SKY), segment(2, PERSON)]
    evaluator = PanopticEvaluator(CATEGORIES, workers=0)
    evaluator.process(gt, segments, gt, segments)
    results = evaluator.evaluate()
    for key in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st"):
        assert results[key] == pytest.approx(100.0)
    car = results["per_class"][CAR]
    assert (car["name"], car["TP"], car["FP"], car["FN"], car["PQ"]) == ("car", 0, 0, 0, 0.0)


def test_pq_one_tp_one_fp_one_fn():
    gt = np.zeros((10, 10), dtype=np.int32)
    pred = np.zeros((10, 10), dtype=np.int32)
    gt[0] = 1  # person A, 10 pixels
    gt[2] = 2  # person B, never predicted -> FN
    gt[4:] = 3  # sky, 60 pixels
    pred[0, :6] = 1  # person on 6 of A's pixels: IoU 6 / 10 = 0.6 -> TP
    pred[4] = 2  # person on sky pixels (not void, no crowd) -> FP
    pred[5:] = 3  # sky on 50 of 60 pixels: IoU 50 / 60
    gt_segments = [segment(1, PERSON), segment(2, PERSON), segment(3, SKY)]
    pred_segments = [segment(1, PERSON), segment(2, PERSON), segment(3, SKY)]
    evaluator = PanopticEvaluator(CATEGORIES, workers=0)
    evaluator.process(pred, pred_segments, gt, gt_segments)
    results = evaluator.evaluate()

    # person: PQ = 0.6 / (1 + 0.5 + 0.5) = 0.3, SQ = 0.6, RQ = 1 / 2 = 0.5
    person = results["per_class"][PERSON]
    assert (person["TP"], person["FP"], person["FN"]) == (1, 1, 1)
    assert person["PQ"] == pytest.approx(30.0)
    assert person["SQ"] == pytest.approx(60.0)
    assert person["RQ"] == pytest.approx(50.0)
    # sky: PQ = SQ = 5/6, RQ = 1. Car never appears and is left out of every average.
    assert results["PQ_st"] == pytest.approx(100 * 5 / 6)
    assert results["PQ_th"] == pytest.approx(30.0)
    assert results["PQ"] == pytest.approx(100 * (0.3 + 5 / 6) / 2)
    assert results["SQ"] == pytest.approx(100 * (0.6 + 5 / 6) / 2)
    assert results["RQ"] == pytest.approx(100 * (0.5 + 1) / 2)


def test_pq_void_pixels_leave_the_union():
    gt = np.zeros((2, 10), dtype=np.int32)
    gt[0] = 1  # person on row 0, row 1 is void
    pred = np.ones((2, 10), dtype=np.int32)  # person on both rows
    evaluator = PanopticEvaluator(CATEGORIES, workers=0)
    evaluator.process(pred, [segment(1, PERSON)], gt, [segment(1, PERSON)])
    # Union 20 - 10 void pixels = 10 -> IoU 1 (it would be 0.5, no match, with void counted).
    person = evaluator.evaluate()["per_class"][PERSON]
    assert (person["TP"], person["FP"], person["FN"]) == (1, 0, 0)
    assert person["SQ"] == pytest.approx(100.0)


def test_pq_prediction_mostly_on_void_is_ignored():
    gt = np.zeros((3, 10), dtype=np.int32)
    gt[0] = 1  # sky on row 0, rows 1-2 are void
    pred = np.zeros((3, 10), dtype=np.int32)
    pred[0, :6] = 1  # sky
    pred[0, 6:8] = 2  # car A: 2 pixels on sky + 3 on void -> 3/5 > 1/2, ignored
    pred[1, :3] = 2
    pred[0, 8:] = 3  # car B: 2 pixels on sky + 2 on void -> 2/4 is not > 1/2, FP
    pred[2, :2] = 3
    evaluator = PanopticEvaluator(CATEGORIES, workers=0)
    evaluator.process(
        pred, [segment(1, SKY), segment(2, CAR), segment(3, CAR)], gt, [segment(1, SKY)]
    )
    assert evaluator.evaluate()["per_class"][CAR]["FP"] == 1


def test_pq_crowd_rules():
    gt = np.zeros((4, 10), dtype=np.int32)
    gt[:2] = 1  # person crowd, 20 pixels
    gt[2:] = 2  # sky
    pred = np.zeros((4, 10), dtype=np.int32)
    pred[1] = 1  # person: 10 of its 14 pixels on the person crowd -> ignored
    pred[2, :4] = 1
    pred[0] = 2  # car on the person crowd: another class's crowd does not excuse it -> FP
    pred[3] = 3  # person on sky only -> FP
    gt_segments = [segment(1, PERSON, iscrowd=1), segment(2, SKY)]
    pred_segments = [segment(1, PERSON), segment(2, CAR), segment(3, PERSON)]
    evaluator = PanopticEvaluator(CATEGORIES, workers=0)
    evaluator.process(pred, pred_segments, gt, gt_segments)
    per_class = evaluator.evaluate()["per_class"]
    # The crowd itself is never a FN.
    assert (per_class[PERSON]["TP"], per_class[PERSON]["FP"], per_class[PERSON]["FN"]) == (0, 1, 0)
    assert per_class[CAR]["FP"] == 1
    # No sky is predicted: its segment is a FN.
    assert per_class[SKY]["FN"] == 1


def _reference_pq_stats(pred, pred_segments, gt, gt_segments, num_classes):
    """pq_compute's rules written out with loops over pixels."""
    overlap = Counter()
    for gt_id, pred_id in zip(gt.ravel().tolist(), pred.ravel().tolist()):
        overlap[gt_id, pred_id] += 1
    gt_area = Counter(gt.ravel().tolist())
    pred_area = Counter(pred.ravel().tolist())
    gts = {s["id"]: s for s in gt_segments}
    preds = {s["id"]: s for s in pred_segments}
    iou_sum = [0.0] * num_classes
    tp, fp, fn = [0] * num_classes, [0] * num_classes, [0] * num_classes
    matched_gt, matched_pred = set(), set()
    for g in gts.values():
        for p in preds.values():
            if g["iscrowd"] or g["category_id"] != p["category_id"]:
                continue
            inter = overlap[g["id"], p["id"]]
            iou = inter / (gt_area[g["id"]] + pred_area[p["id"]] - inter - overlap[0, p["id"]])
            if iou > 0.5:
                tp[g["category_id"]] += 1
                iou_sum[g["category_id"]] += iou
                matched_gt.add(g["id"])
                matched_pred.add(p["id"])
    crowd = {g["category_id"]: g["id"] for g in gts.values() if g["iscrowd"]}
    for g in gts.values():
        if g["id"] not in matched_gt and not g["iscrowd"]:
            fn[g["category_id"]] += 1
    for p in preds.values():
        if p["id"] in matched_pred:
            continue
        ignored = overlap[0, p["id"]] + overlap[crowd.get(p["category_id"], -1), p["id"]]
        if ignored / pred_area[p["id"]] <= 0.5:
            fp[p["category_id"]] += 1
    return iou_sum, tp, fp, fn


def _random_panoptic_image(rng):
    """12x12 ground truth of 3x3-pixel cells (with void and thing crowds) and a noisy prediction."""
    labels = rng.integers(0, 3, size=(4, 4))
    instance = rng.integers(0, 2, size=(4, 4))
    crowd = (rng.random((4, 4)) < 0.2) & (labels != SKY)
    void = rng.random((4, 4)) < 0.15
    cell_masks, mask_labels, mask_crowd = [], [], []
    for label in (PERSON, CAR):
        for index in (0, 1):
            cell_masks.append((labels == label) & (instance == index) & ~crowd & ~void)
            mask_labels.append(label)
            mask_crowd.append(False)
        cell_masks.append((labels == label) & crowd & ~void)
        mask_labels.append(label)
        mask_crowd.append(True)
    cell_masks.append((labels == SKY) & ~void)
    mask_labels.append(SKY)
    mask_crowd.append(False)
    masks = np.stack([np.kron(cells, np.ones((3, 3), dtype=bool)) for cells in cell_masks])
    is_thing = [c["isthing"] for c in CATEGORIES]
    gt, gt_segments = masks_to_panoptic(
        masks, np.array(mask_labels), np.array(mask_crowd), is_thing
    )

    # Prediction: ground-truth ids with 20% of pixels re-drawn (void and one new id included);
    # a segment takes its ground-truth class, or a random one 20% of the time.
    pred = gt.copy()
    noise = rng.random(gt.shape) < 0.2
    pred[noise] = rng.integers(0, len(gt_segments) + 2, size=noise.sum())
    pred_segments = []
    for pred_id in np.unique(pred).tolist():
        if pred_id == 0:
            continue
        if pred_id > len(gt_segments) or rng.random() < 0.2:
            category = int(rng.integers(0, 3))
        else:
            category = gt_segments[pred_id - 1]["category_id"]
        pred_segments.append(segment(pred_id, category))
    return pred, pred_segments, gt, gt_segments


def test_pq_matches_pixel_loop_reference_on_random_images():
    rng = np.random.default_rng(0)
    evaluator = PanopticEvaluator(CATEGORIES, workers=0)
    totals = [np.zeros(3), np.zeros(3), np.zeros(3), np.zeros(3)]
    for _ in range(30):
        pred, pred_segments, gt, gt_segments = _random_panoptic_image(rng)
        evaluator.process(pred, pred_segments, gt, gt_segments)
        for total, values in zip(
            totals, _reference_pq_stats(pred, pred_segments, gt, gt_segments, 3)
        ):
            total += values
    state = evaluator.state()
    np.testing.assert_allclose(state["iou_sum"], totals[0])
    for key, total in zip(("tp", "fp", "fn"), totals[1:]):
        np.testing.assert_array_equal(state[key], total)
    assert state["tp"].sum() > 0 and state["fp"].sum() > 0 and state["fn"].sum() > 0

    iou_sum, tp, fp, fn = totals
    pq = iou_sum / (tp + 0.5 * fp + 0.5 * fn)
    results = evaluator.evaluate()
    assert results["PQ"] == pytest.approx(100 * pq.mean())
    assert results["PQ_th"] == pytest.approx(100 * pq[:2].mean())
    assert results["PQ_st"] == pytest.approx(100 * pq[2])


def test_masks_to_panoptic_merges_crowds_and_rejects_overlaps():
    masks = np.zeros((4, 2, 3), dtype=bool)
    masks[0, 0, 0] = masks[1, 0, 1] = masks[2, 1, :] = True  # two person crowds, one sky
    # masks[3] is empty and is skipped
    labels = np.array([PERSON, PERSON, SKY, CAR])
    is_crowd = np.array([True, True, False, False])
    seg, segments = masks_to_panoptic(masks, labels, is_crowd, [True, True, False])
    assert seg.tolist() == [[1, 1, 0], [2, 2, 2]]
    assert segments == [
        {"id": 1, "category_id": PERSON, "iscrowd": 1, "isthing": 1},
        {"id": 2, "category_id": SKY, "iscrowd": 0, "isthing": 0},
    ]
    masks[3, 1, 1] = True
    with pytest.raises(ValueError, match="overlap"):
        masks_to_panoptic(masks, labels, is_crowd, [True, True, False])


def test_panoptic_rejects_inconsistent_segments():
    seg = np.ones((2, 2), dtype=np.int32)
    evaluator = PanopticEvaluator(CATEGORIES, workers=0)
    with pytest.raises(ValueError, match="missing from its segment list"):
        evaluator.process(seg, [], seg, [segment(1, SKY)])
    with pytest.raises(ValueError, match="category_id 7"):
        evaluator.process(seg, [{"id": 1, "category_id": 7}], seg, [segment(1, SKY)])
    with pytest.raises(ValueError, match=r"ids \[2\] that cover no pixel"):
        evaluator.process(seg, [segment(1, SKY), segment(2, CAR)], seg, [segment(1, SKY)])
    with pytest.raises(ValueError, match="shape"):
        evaluator.process(seg, [segment(1, SKY)], seg[:1], [segment(1, SKY)])
    with pytest.raises(
        ValueError, match=r"ground-truth segment .* lacks the key\(s\) \['iscrowd'\]"
    ):
        evaluator.process(seg, [segment(1, SKY)], seg, [{"id": 1, "category_id": SKY}])
    with pytest.raises(ValueError, match="integer ids, not float64"):
        evaluator.process(seg * 1.0, [segment(1, SKY)], seg, [segment(1, SKY)])
    # With workers the error surfaces later, naming the image.
    pooled = PanopticEvaluator(CATEGORIES, workers=1)
    pooled.process(seg, [segment(1, SKY)], seg, [segment(1, SKY)], image_id=3)
    pooled.process(seg, [], seg, [segment(1, SKY)], image_id=4)
    with pytest.raises(ValueError, match="image 4: predicted map has segment ids"):
        pooled.evaluate()


def test_pq_empty_images():
    void = np.zeros((4, 4), dtype=np.int32)
    evaluator = PanopticEvaluator(CATEGORIES, workers=0)
    evaluator.process(void, [], void, [])  # nothing annotated, nothing predicted
    evaluator.process(void + 1, [segment(1, CAR)], void, [])  # prediction on void only
    state = evaluator.state()
    assert state["tp"].sum() == state["fp"].sum() == state["fn"].sum() == 0
    results = evaluator.evaluate()
    # pq_compute divides by zero here; every average is 0 over N = 0 classes.
    assert (results["PQ"], results["N"], results["PQ_th"], results["N_st"]) == (0.0, 0, 0.0, 0)

    gt = np.zeros((4, 4), dtype=np.int32)
    gt[:2], gt[2:] = 1, 2
    evaluator.process(void, [], gt, [segment(1, SKY), segment(2, PERSON, iscrowd=1)])
    results = evaluator.evaluate()
    # Nothing predicted: the sky is a FN, the crowd nothing.
    assert [(c["TP"], c["FP"], c["FN"]) for c in results["per_class"]] == [(0, 0, 0)] * 2 + [
        (0, 0, 1)
    ]
    assert (results["N"], results["N_th"], results["N_st"], results["PQ"]) == (1, 0, 1, 0.0)


def test_pq_crowd_region_is_the_last_listed_of_its_class():
    gt = np.zeros((2, 8), dtype=np.int32)
    gt[:, :4], gt[:, 4:] = 1, 2
    crowds = [segment(1, PERSON, iscrowd=1), segment(2, PERSON, iscrowd=1)]
    people = [segment(1, PERSON), segment(2, PERSON)]
    evaluator = PanopticEvaluator(CATEGORIES, workers=0)
    evaluator.process(gt, people, gt, crowds)
    # pq_compute keeps one crowd region per class, the last listed: the person on crowd 2 is
    # ignored, the one on crowd 1 is a false positive.
    person = evaluator.evaluate()["per_class"][PERSON]
    assert (person["TP"], person["FP"], person["FN"]) == (0, 1, 0)


def test_pq_ground_truth_area_and_unlisted_ids_follow_pq_compute():
    gt = np.zeros((1, 10), dtype=np.int32)
    gt[0, :6] = 1  # sky, 6 pixels
    gt[0, 6:] = 9  # an id that the segment list lacks
    pred = np.zeros((1, 10), dtype=np.int32)
    pred[0, :4] = 1  # sky on 4 of the 6: IoU 4 / 6
    pred[0, 6:] = 2  # car on the unlisted id: those pixels are not void, so a FP
    pred_segments = [segment(1, SKY), segment(2, CAR)]
    evaluator = PanopticEvaluator(CATEGORIES, workers=0)
    evaluator.process(pred, pred_segments, gt, [segment(1, SKY)])
    per_class = evaluator.evaluate()["per_class"]
    assert (per_class[SKY]["TP"], per_class[SKY]["SQ"]) == (1, pytest.approx(100 * 4 / 6))
    assert per_class[CAR]["FP"] == 1

    # An "area" in the segment dict (COCO JSON) wins over the pixel count, as in pq_compute:
    # 8 gives IoU 4 / (4 + 8 - 4) = 0.5, no match.
    evaluator.reset()
    evaluator.process(pred, pred_segments, gt, [{**segment(1, SKY), "area": 8}])
    sky = evaluator.evaluate()["per_class"][SKY]
    assert (sky["TP"], sky["FP"], sky["FN"]) == (0, 1, 1)


def _random_images(seed, count):
    rng = np.random.default_rng(seed)
    return [_random_panoptic_image(rng) for _ in range(count)]


def test_pool_gives_bit_identical_sums_and_bounds_the_queue():
    sequential = PanopticEvaluator(CATEGORIES, workers=0)
    pooled = PanopticEvaluator(CATEGORIES, workers=2)
    for image in _random_images(3, 16):
        sequential.process(*image)
        pooled.process(*image)
        assert len(pooled._pending) <= 4  # at most 2 x workers images wait
    expected, state = sequential.state(), pooled.state()
    for key in ("iou_sum", "tp", "fp", "fn"):
        np.testing.assert_array_equal(state[key], expected[key])
    assert pooled.evaluate() == sequential.evaluate()


def test_pool_works_with_spawned_workers():
    images = _random_images(4, 4)
    sequential = PanopticEvaluator(CATEGORIES, workers=0)
    spawned = PanopticEvaluator(CATEGORIES, workers=1, start_method="spawn")
    for image in images:
        sequential.process(*image)
        spawned.process(*image)
    assert spawned.evaluate() == sequential.evaluate()


def test_large_segment_ids_give_the_same_statistics():
    # COCO PNG ids (R + 256 G + 256^2 B) are large: counted by sorting instead of a histogram.
    small_ids = PanopticEvaluator(CATEGORIES, workers=0)
    large_ids = PanopticEvaluator(CATEGORIES, workers=0)
    for pred, pred_segments, gt, gt_segments in _random_images(5, 8):
        small_ids.process(pred, pred_segments, gt, gt_segments)
        large_ids.process(
            np.where(pred > 0, pred * 65793 + 40000, 0),
            [{**s, "id": s["id"] * 65793 + 40000} for s in pred_segments],
            np.where(gt > 0, gt * 70001 + 3, 0),
            [{**s, "id": s["id"] * 70001 + 3} for s in gt_segments],
        )
    assert large_ids.evaluate() == small_ids.evaluate()


def test_written_predictions_are_coco_panoptic_files(tmp_path):
    images = _random_images(6, 5)
    writer = PanopticEvaluator(CATEGORIES, workers=1, output_dir=tmp_path)
    for image_id, image in enumerate(images):
        writer.process(*image, image_id=image_id, file_name=f"val/{image_id:06d}.jpg")
    written = writer.evaluate()

    with open(tmp_path / "predictions.json") as file:
        annotations = json.load(file)["annotations"]
    assert [a["image_id"] for a in annotations] == list(range(5))
    assert annotations[2]["file_name"] == "000002.png"
    # Segment ids as in the map, dataset category ids (person 1, car 3, sky 17).
    assert annotations[2]["segments_info"] == [
        {"id": s["id"], "category_id": CATEGORIES[s["category_id"]]["id"]} for s in images[2][1]
    ]
    reader = PanopticEvaluator(CATEGORIES, workers=0)
    for image_id, (pred, pred_segments, gt, gt_segments) in enumerate(images):
        read = read_panoptic_png(tmp_path / "predictions" / f"{image_id:06d}.png")
        np.testing.assert_array_equal(read, pred)
        reader.process(read, pred_segments, gt, gt_segments)
    assert reader.evaluate() == written
    with pytest.raises(ValueError, match="needs image_id and file_name"):
        writer.process(*images[0])


def test_segment_ids_round_trip_through_png(tmp_path):
    ids = np.array([[0, 1, 255], [256, 65535, 256**3 - 1]])
    assert id_to_rgb(ids)[1].tolist() == [[0, 1, 0], [255, 255, 0], [255, 255, 255]]
    write_panoptic_png(tmp_path / "ids.png", ids)
    np.testing.assert_array_equal(read_panoptic_png(tmp_path / "ids.png"), ids)
    with pytest.raises(ValueError, match="fit a PNG"):
        id_to_rgb(np.array([[256**3]]))
    Image.fromarray(np.zeros((2, 2), dtype=np.uint8)).save(tmp_path / "gray.png")
    with pytest.raises(ValueError, match="gray.png: expected an RGB"):
        read_panoptic_png(tmp_path / "gray.png")


@pytest.mark.parametrize("libspng", ["pyspng", "without pyspng"])
@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_panoptic_png_reads_as_pillow_decodes_it(tmp_path, monkeypatch, mode, libspng):
    """libspng's decoding gives the ids of Pillow's pixels (alpha ignored), and without
    pyspng (the GPU machine) Pillow's decoding gives them; a broken file is an error that
    names it."""
    if libspng == "without pyspng":
        monkeypatch.setattr(panoptic_io, "libspng", lambda: None)
    else:
        assert panoptic_io.libspng() is not None
    pixels = np.random.default_rng(3).integers(0, 256, size=(37, 53, len(mode)), dtype=np.uint8)
    Image.fromarray(pixels, mode).save(tmp_path / "ids.png")
    with Image.open(tmp_path / "ids.png") as png:
        decoded = np.asarray(png)[..., :3].astype(np.uint32)
    expected = decoded[..., 0] + 256 * decoded[..., 1] + 256**2 * decoded[..., 2]
    read = read_panoptic_png(tmp_path / "ids.png")
    assert read.dtype == np.uint32
    np.testing.assert_array_equal(read, expected)

    data = (tmp_path / "ids.png").read_bytes()
    (tmp_path / "broken.png").write_bytes(data[: len(data) // 2])
    problem = "pyspng" if libspng == "pyspng" else "image file is truncated"
    with pytest.raises(ValueError, match=f"broken.png: {problem}"):
        read_panoptic_png(tmp_path / "broken.png")


# ----------------------------------------------------------------------------- semantic


def test_miou_hand_computed_with_ignore():
    gt = np.array([[0, 0, 1, 1], [0, 255, 1, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 1]])
    # Valid pixels (gt, pred): (0,0) (0,1) (1,1) (1,1) (0,2) (1,2) (1,1); the ignore pixel is out.
    # Confusion (rows gt, cols pred): [[1, 1, 1], [0, 3, 1], [0, 0, 0]]
    # IoU0 = 1 / (3 + 1 - 1) = 1/3, IoU1 = 3 / (4 + 4 - 3) = 3/5, class 2 has no gt -> NaN.
    evaluator = SemanticEvaluator(3, ["a", "b", "c"])
    evaluator.process(torch.from_numpy(pred), torch.from_numpy(gt))
    results = evaluator.evaluate()
    np.testing.assert_array_equal(results["confusion_matrix"], [[1, 1, 1], [0, 3, 1], [0, 0, 0]])
    assert results["mIoU"] == pytest.approx(100 * (1 / 3 + 3 / 5) / 2)
    assert results["fwIoU"] == pytest.approx(100 * (3 / 7 * 1 / 3 + 4 / 7 * 3 / 5))
    assert results["pACC"] == pytest.approx(100 * 4 / 7)
    assert results["mACC"] == pytest.approx(100 * (1 / 3 + 3 / 4) / 2)
    assert results["per_class_iou"][:2] == pytest.approx([100 / 3, 60.0])
    assert math.isnan(results["per_class_iou"][2])


def test_miou_matches_per_class_mask_reference():
    rng = np.random.default_rng(7)
    evaluator = SemanticEvaluator(4, ["a", "b", "c", "d"])
    intersection, union, gt_pixels = np.zeros(4), np.zeros(4), np.zeros(4)
    for _ in range(5):
        gt = rng.choice([0, 1, 2, 255], size=(9, 11))  # class 3 never in the ground truth
        pred = rng.integers(0, 4, size=(9, 11))
        evaluator.process(pred, gt)
        valid = gt != 255
        for c in range(4):
            intersection[c] += ((gt == c) & (pred == c) & valid).sum()
            union[c] += (((gt == c) | (pred == c)) & valid).sum()
            gt_pixels[c] += (gt == c).sum()
    results = evaluator.evaluate()
    iou = intersection[:3] / union[:3]
    assert results["per_class_iou"][:3] == pytest.approx(100 * iou)
    assert math.isnan(results["per_class_iou"][3])
    assert results["mIoU"] == pytest.approx(100 * iou.mean())
    assert results["pACC"] == pytest.approx(100 * intersection.sum() / gt_pixels.sum())


def test_semantic_save_writes_tables(tmp_path):
    evaluator = SemanticEvaluator(2, ["road", "car"])
    evaluator.process(np.array([[0, 1], [1, 1]]), np.array([[0, 1], [0, 255]]))
    with pytest.raises(RuntimeError, match="evaluate"):
        evaluator.save(str(tmp_path))
    results = evaluator.evaluate()
    evaluator.save(str(tmp_path))
    np.testing.assert_array_equal(np.load(tmp_path / "confusion_matrix.npy"), [[1, 1], [0, 1]])
    with open(tmp_path / "per_class.csv") as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["class", "IoU", "ACC"]
    assert float(rows[1][1]) == pytest.approx(results["per_class_iou"][0], abs=1e-3)
    with open(tmp_path / "confusion_matrix.csv") as file:
        assert list(csv.reader(file))[2] == ["car", "0", "1"]


def test_semantic_rejects_out_of_range_labels():
    evaluator = SemanticEvaluator(2, ["road", "car"])
    with pytest.raises(ValueError, match="gt_labels"):
        evaluator.process(np.zeros((2, 2)), np.full((2, 2), 5))
    with pytest.raises(ValueError, match="pred_labels"):
        evaluator.process(np.full((2, 2), 2), np.zeros((2, 2)))


def test_masks_to_semantic_crowd_keeps_label_and_instances_win():
    masks = np.zeros((2, 2, 3), dtype=bool)
    masks[0, :, :2] = True  # car, not crowd
    masks[1, :, 1:] = True  # person crowd overlapping it
    label_map = masks_to_semantic(masks, np.array([CAR, PERSON]), np.array([False, True]))
    assert label_map.tolist() == [[CAR, CAR, PERSON], [CAR, CAR, PERSON]]
    empty = masks_to_semantic(np.zeros((0, 2, 2)), np.zeros(0), np.zeros(0), ignore_index=255)
    assert (empty == 255).all()


# ----------------------------------------------------------------------------- instance


def _instance_images():
    """Two 16x16 images with person/car instances, a person crowd and a sky region."""
    images = []
    for shift in (0, 5):
        masks = np.zeros((4, 16, 16), dtype=bool)
        masks[0, 1 + shift : 6 + shift, 1:6] = True  # person
        masks[1, 8:14, 2 + shift : 10 + shift] = True  # car
        masks[2, 0:4, 10:16] = True  # person crowd
        masks[3, 14:, :] = True  # sky (stuff, not evaluated)
        gt = {
            "masks": torch.from_numpy(masks),
            "labels": torch.tensor([PERSON, CAR, PERSON, SKY]),
            "is_crowd": torch.tensor([False, False, True, False]),
        }
        images.append(gt)
    return images


def _perfect_prediction(gt):
    return {
        "masks": gt["masks"][[0, 1, 3]],
        "scores": torch.tensor([0.9, 0.8, 0.7]),
        "labels": gt["labels"][[0, 1, 3]],
    }


def test_instance_ap_perfect_and_worse():
    images = _instance_images()
    evaluator = InstanceEvaluator(CATEGORIES)
    for image_id, gt in enumerate(images):
        evaluator.process(image_id, gt, _perfect_prediction(gt))
    results = evaluator.evaluate()
    assert results["AP"] == pytest.approx(100.0)
    assert results["AP50"] == pytest.approx(100.0)
    assert [entry["name"] for entry in results["per_class"]] == ["person", "car"]
    assert [entry["AP"] for entry in results["per_class"]] == pytest.approx([100.0, 100.0])

    # The first image's person shifted by 3 of its 5 rows (IoU 2/8): a miss plus a false positive.
    evaluator.reset()
    for image_id, gt in enumerate(images):
        pred = _perfect_prediction(gt)
        if image_id == 0:
            pred["masks"] = pred["masks"].clone()
            pred["masks"][0] = torch.roll(pred["masks"][0], 3, dims=0)
        evaluator.process(image_id, gt, pred)
    worse = evaluator.evaluate()
    assert worse["AP"] < 100.0
    assert worse["per_class"][1]["AP"] == pytest.approx(100.0)
    assert worse["per_class"][0]["AP"] < 100.0


def _one_person(box_rows, box_cols, size=16):
    mask = np.zeros((1, size, size), dtype=bool)
    mask[0, box_rows, box_cols] = True
    return torch.from_numpy(mask)


def test_instance_ap_hand_computed():
    gt = {
        "masks": _one_person(slice(0, 5), slice(0, 5)),  # 25 pixels: a small object
        "labels": torch.tensor([PERSON]),
        "is_crowd": torch.tensor([False]),
    }
    # A false positive ranked above an exact hit: precision 1/2 at every recall -> AP 50.
    pred = {
        "masks": torch.cat([_one_person(slice(10, 15), slice(10, 15)), gt["masks"]]),
        "scores": torch.tensor([0.9, 0.6]),
        "labels": torch.tensor([PERSON, PERSON]),
    }
    evaluator = InstanceEvaluator(CATEGORIES)
    evaluator.process(0, gt, pred)
    results = evaluator.evaluate()
    assert (results["AP"], results["AP50"], results["APs"]) == pytest.approx((50.0, 50.0, 50.0))
    assert math.isnan(results["APm"]) and math.isnan(results["APl"])  # no such objects
    assert results["AR100"] == pytest.approx(100.0)

    # A 4x4 detection inside the 5x5 person, IoU 16 / 25 = 0.64: a hit at the IoU thresholds
    # 0.50, 0.55 and 0.60 of the ten, so AP = 30, AP50 = 100, AP75 = 0.
    evaluator.reset()
    pred = {
        "masks": _one_person(slice(0, 4), slice(0, 4)),
        "scores": torch.tensor([0.7]),
        "labels": torch.tensor([PERSON]),
    }
    evaluator.process(0, gt, pred)
    results = evaluator.evaluate()
    assert (results["AP"], results["AP50"], results["AP75"]) == pytest.approx((30.0, 100.0, 0.0))


def test_instance_ap_equals_cocoeval_run_on_json_files(tmp_path):
    _, _, instance = _split_inputs()
    evaluator = InstanceEvaluator(CATEGORIES)
    images, annotations, results = [], [], []
    for image_id, gt, pred in instance:
        evaluator.process(image_id, gt, pred)
        images.append({"id": image_id, "height": 16, "width": 16})
        for mask, label, crowd in zip(gt["masks"].numpy(), gt["labels"].tolist(), gt["is_crowd"]):
            if CATEGORIES[label]["isthing"]:
                rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": CATEGORIES[label]["id"],
                        "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                        "area": float(mask.sum()),
                        "bbox": mask_util.toBbox(rle).tolist(),
                        "iscrowd": int(crowd),
                    }
                )
        for mask, score, label in zip(pred["masks"].numpy(), pred["scores"], pred["labels"]):
            if CATEGORIES[label]["isthing"]:
                rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
                results.append(
                    {
                        "image_id": image_id,
                        "category_id": CATEGORIES[label]["id"],
                        "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                        "score": float(score),
                    }
                )
    categories = [{"id": c["id"], "name": c["name"]} for c in CATEGORIES if c["isthing"]]
    with open(tmp_path / "gt.json", "w") as file:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, file)
    with open(tmp_path / "results.json", "w") as file:
        json.dump(results, file)

    # pycocotools as one would run it by hand on the two files.
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(tmp_path / "gt.json"))
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(str(tmp_path / "results.json")), "segm")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    ours = evaluator.evaluate()
    expected = [100 * value if value >= 0 else float("nan") for value in coco_eval.stats]
    assert [ours[key] for key in COCO_STATS] == pytest.approx(expected, nan_ok=True)
    assert 0 < ours["AP"] < 100


def test_instance_prediction_on_crowd_is_not_a_false_positive():
    gt = _instance_images()[0]
    pred = _perfect_prediction(gt)
    pred["masks"] = torch.cat([pred["masks"], gt["masks"][2:3]])  # person on the crowd region
    pred["scores"] = torch.tensor([0.5, 0.8, 0.7, 0.95])
    pred["labels"] = torch.tensor([PERSON, CAR, SKY, PERSON])
    evaluator = InstanceEvaluator(CATEGORIES)
    evaluator.process(7, gt, pred)
    assert evaluator.evaluate()["AP"] == pytest.approx(100.0)


def test_instance_no_predictions_gives_zeros():
    evaluator = InstanceEvaluator(CATEGORIES)
    empty = {"masks": torch.zeros(0, 16, 16, dtype=torch.bool), "scores": torch.zeros(0)}
    empty["labels"] = torch.zeros(0, dtype=torch.int64)
    evaluator.process(0, _instance_images()[0], empty)
    results = evaluator.evaluate()
    assert results["AP"] == 0.0 and results["APl"] == 0.0
    assert [entry["AP"] for entry in results["per_class"]] == [0.0, 0.0]


# ----------------------------------------------------------------------------- distributed


def _split_inputs():
    rng = np.random.default_rng(1)
    panoptic = [_random_panoptic_image(rng) for _ in range(6)]
    semantic = [(rng.integers(0, 3, (8, 8)), rng.choice([0, 1, 2, 255], (8, 8))) for _ in range(6)]
    instance = []
    for image_id, gt in enumerate(_instance_images() * 3):
        pred = _perfect_prediction(gt)
        pred["masks"] = torch.roll(pred["masks"], image_id % 3, dims=1)
        pred["scores"] = torch.from_numpy(rng.random(3))
        instance.append((image_id, gt, pred))
    return panoptic, semantic, instance


def _fill(evaluators, inputs, indices):
    panoptic, semantic, instance = inputs
    for i in indices:
        evaluators["panoptic"].process(*panoptic[i], image_id=i, file_name=f"{i:06d}.jpg")
        evaluators["semantic"].process(*semantic[i])
        evaluators["instance"].process(*instance[i])


def _new_evaluators(panoptic_workers=0, output_dir=None):
    return {
        "panoptic": PanopticEvaluator(CATEGORIES, panoptic_workers, output_dir),
        "semantic": SemanticEvaluator(3, ["person", "car", "sky"]),
        "instance": InstanceEvaluator(CATEGORIES),
    }


def _assert_same_results(first, second):
    assert first.keys() == second.keys()
    for key, value in first.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(value, second[key])
        elif isinstance(value, list) and isinstance(value[0], dict):
            for first_entry, second_entry in zip(value, second[key], strict=True):
                assert first_entry == pytest.approx(second_entry, nan_ok=True), key
        else:
            assert value == pytest.approx(second[key], nan_ok=True), key


def test_merged_states_equal_single_evaluator():
    inputs = _split_inputs()
    single = _new_evaluators()
    _fill(single, inputs, range(6))
    first, second = _new_evaluators(), _new_evaluators()
    _fill(first, inputs, [0, 2, 4])
    _fill(second, inputs, [1, 3, 5])
    for name, evaluator in single.items():
        merged = evaluator.merge_states([first[name].state(), second[name].state()])
        _assert_same_results(evaluator.evaluate(), evaluator.compute(merged))
    # An image counted on two ranks is refused.
    _fill(second, inputs, [0])
    with pytest.raises(ValueError, match=r"image ids \[0\] were processed more than once"):
        single["panoptic"].merge_states([first["panoptic"].state(), second["panoptic"].state()])


def _distributed_worker(rank, world_size, init_file, result_dir):
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        # Each rank scores its panoptic images in a pool of its own and writes its PNGs.
        evaluators = _new_evaluators(panoptic_workers=1, output_dir=f"{result_dir}/panoptic")
        _fill(evaluators, _split_inputs(), range(rank, 6, world_size))
        results = {name: evaluator.evaluate() for name, evaluator in evaluators.items()}
        torch.save(results, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_evaluate_under_torch_distributed(tmp_path):
    # fork: the workers need no fresh interpreter, and starting one costs seconds.
    mp.start_processes(
        _distributed_worker,
        args=(2, str(tmp_path / "init"), str(tmp_path)),
        nprocs=2,
        start_method="fork",
    )
    inputs = _split_inputs()
    single = _new_evaluators()
    _fill(single, inputs, range(6))
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for name, evaluator in single.items():
            _assert_same_results(evaluator.evaluate(), results[name])

    # Rank 0 wrote the JSON of all images; read back, the files give the same PQ.
    with open(tmp_path / "panoptic" / "predictions.json") as file:
        annotations = json.load(file)["annotations"]
    assert [annotation["image_id"] for annotation in annotations] == list(range(6))
    reader = PanopticEvaluator(CATEGORIES, workers=0)
    for image_id, (_, pred_segments, gt_seg, gt_segments) in enumerate(inputs[0]):
        pred_seg = read_panoptic_png(tmp_path / "panoptic" / "predictions" / f"{image_id:06d}.png")
        reader.process(pred_seg, pred_segments, gt_seg, gt_segments)
    assert reader.evaluate() == single["panoptic"].evaluate()


# ----------------------------------------------------------------------------- pictures


def test_draw_panoptic_shape_and_pixels():
    image = np.full((40, 50, 3), 100, dtype=np.uint8)
    seg = np.zeros((40, 50), dtype=np.int32)
    seg[:20] = 1
    seg[25:35, 10:30] = 2
    segments = [segment(1, SKY), segment(2, PERSON)]
    picture = draw_panoptic(image, seg, segments, CATEGORIES)
    scale = upscale_factor(40, 50)
    assert scale == 3
    assert picture.dtype == np.uint8
    assert picture.shape[1:] == (150, 3)
    assert picture.shape[0] > 120  # the image plus a legend strip
    # Inside the sky segment, away from outline and text: half image, half sky colour.
    np.testing.assert_allclose(picture[3 * 2, 3 * 2], [85, 115, 140], atol=1)
    # Void pixels far from any segment keep the image colour.
    assert (picture[3 * 38, 3 * 45] == 100).all()
    # A thing's colour is jittered around its category colour but still blended.
    assert not (picture[3 * 26, 3 * 12] == 100).all()


def test_side_by_side_shape_and_titles():
    left = np.zeros((30, 20, 3), dtype=np.uint8)
    right = np.full((40, 25, 3), 255, dtype=np.uint8)
    panel = side_by_side([left, right], ["a", "b"], gap=4)
    title_height = panel.shape[0] - 40
    assert panel.shape == (title_height + 40, 20 + 4 + 25, 3)
    assert panel.dtype == np.uint8
    assert (panel[title_height:, 24:] == 255).all()
    assert (panel[title_height : title_height + 30, :20] == 0).all()
    with pytest.raises(ValueError, match="titles"):
        side_by_side([left], ["a", "b"])
