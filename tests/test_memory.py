"""Memory stays flat over many images: evaluation and the predictor keep nothing per image but
what a metric needs (instance AP: one compressed RLE per mask) and what goes to disk.

Measured between image FIRST and image LAST of one run, at the same point of the loop:

- the number of live tensors (their storage is invisible to tracemalloc): a result kept;
- the number of objects the garbage collector tracks (dicts, lists, tuples with objects in
  them, ...): per-image statistics, segment lists, JSON entries kept;
- the Python memory tracemalloc traces, numpy arrays included: a dense mask, a map kept.

Container and tensor counts are exact. Traced bytes have noise: small blocks that torch
(and PIL) allocate and keep, filling up over the first thousand calls; 40 to 45 KB were measured
over a window (torch 2.x, CPU), hence NOISE_BYTES. The leak tests check that the measurement
sees a regression of each kind.
"""

import gc
import json
import tracemalloc
from concurrent.futures import Future

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from eomt.data import collate
from eomt.data.build import build_dataset
from eomt.deploy.predictor import Predictor, unique_stems, write_predictions
from eomt.deploy.streamed_json import RESERVE_MARGIN, StreamedJson
from eomt.evaluation import InstanceEvaluator, PanopticEvaluator, masks_to_panoptic
from eomt.modeling import build_model
from eomt.tasks import infer
from eomt.tasks.evaluate import build_evaluators, evaluate

FIRST, LAST = 40, 160  # images; the batch size divides both
IMAGES = LAST - FIRST
BATCH = 4
SIZE = 48  # the synthetic images (128 to 192 pixels) shrunk: a fast loop
NOISE_BYTES = 96 << 10  # twice the most measured
LEAK_LAST = 80  # the leak tests need fewer images to see a leak
LEAK_IMAGES = LEAK_LAST - FIRST


@pytest.fixture
def one_thread():
    """Two threads on a shared two-core machine are many times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def setup(tiny_cfg, one_thread):
    cfg = tiny_cfg(
        "test.score_threshold=0.0",  # random weights: keep every segment
        "test.overlap_threshold=0.0",
        f"test.batch_size={BATCH}",
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    dataset = build_dataset(cfg, train=False)
    items = []
    for image, target in (dataset[i] for i in range(len(dataset))):
        image = F.interpolate(image[None], (SIZE, SIZE), mode="bilinear")[0]
        masks = F.interpolate(target["masks"][None].float(), (SIZE, SIZE), mode="nearest")[0]
        items.append((image, {**target, "masks": masks.bool()}))
    return cfg, model, dataset.categories, items


def _live_tensors() -> int:
    return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())


def _snapshot() -> tuple[int, int, int]:
    gc.collect()
    return tracemalloc.get_traced_memory()[0], len(gc.get_objects()), _live_tensors()


def _growth(snapshots: dict) -> dict:
    first, last = (snapshots[key] for key in sorted(snapshots))
    return dict(zip(("bytes", "objects", "tensors"), (b - a for a, b in zip(first, last))))


def _assert_flat(growth: dict, bytes_per_image: float, objects_per_image: int = 0):
    assert growth["tensors"] <= 4, growth
    assert growth["objects"] <= objects_per_image * IMAGES + 20, growth
    assert growth["bytes"] <= bytes_per_image * IMAGES + NOISE_BYTES, growth


def _batches(items, snapshots: dict, last: int):
    """`last` + BATCH images cycled from `items`, each with its own image id."""
    for start in range(0, last + BATCH, BATCH):
        if start in (FIRST, last):
            snapshots[start] = _snapshot()
        images, targets = collate([items[(start + i) % len(items)] for i in range(BATCH)])
        targets = [
            {**target, "image_id": start + i, "file_name": f"{start + i:06d}.jpg"}
            for i, target in enumerate(targets)
        ]
        yield images, targets


def _evaluate(setup, metrics, last: int = LAST, on_image=None) -> tuple[dict, dict]:
    """Growth from image FIRST to image `last` of `evaluate`, and the evaluators it used."""
    cfg, model, categories, items = setup
    cfg.test.metrics = metrics
    used = build_evaluators(metrics, categories, cfg.test)
    snapshots = {}
    tracemalloc.start()
    try:
        evaluate(
            model,
            _batches(items, snapshots, last),
            cfg,
            categories,
            None,
            show=False,
            evaluators=used,
            on_image=on_image,
        )
    finally:
        tracemalloc.stop()
    return _growth(snapshots), used


def test_panoptic_and_semantic_evaluation_keep_sums_only(setup):
    growth, evaluators = _evaluate(setup, ["panoptic", "semantic"])
    panoptic = evaluators["panoptic"]
    predicted = panoptic.true_positives.sum() + panoptic.false_positives.sum()
    assert predicted > LAST, "the random model predicts segments"
    # Kept per image: its id (an int and a list slot, 40 bytes), to refuse an image counted
    # twice at the end.
    _assert_flat(growth, bytes_per_image=64)


def test_instance_evaluation_keeps_one_compact_rle_per_mask(setup, monkeypatch):
    # COCOeval at the end takes seconds and is tested in test_evaluation.py.
    monkeypatch.setattr(InstanceEvaluator, "evaluate", lambda self: {})
    growth, evaluators = _evaluate(setup, ["instance"])
    kept = evaluators["instance"].images[FIRST:LAST]
    masks = sum(len(image.gt_rles) + len(image.pred_rles) for image in kept)
    rle_bytes = sum(len(rle) for image in kept for rle in image.gt_rles + image.pred_rles)
    assert masks > 10 * IMAGES, "the random model predicts instances"
    # Kept per mask: its RLE string (a bytes object, 33 bytes + the string), a list slot, a
    # score and a label; per image: an InstanceImage of two lists and five small arrays. One
    # COCO dict per mask, as the evaluator kept before, takes 400 bytes more per mask.
    assert growth["bytes"] >= rle_bytes, "the RLEs are what is kept"
    _assert_flat(
        growth,
        bytes_per_image=(rle_bytes + 80 * masks) / IMAGES + 1500,
        objects_per_image=3,
    )


def test_the_measurement_sees_results_kept_per_image(setup):
    kept = []
    growth, _ = _evaluate(
        setup, ["panoptic"], last=LEAK_LAST, on_image=lambda results, _: kept.append(results)
    )
    assert growth["tensors"] >= LEAK_IMAGES and growth["objects"] >= LEAK_IMAGES


def test_the_measurement_sees_statistics_kept_per_image(setup, monkeypatch):
    kept, add = [], PanopticEvaluator._add

    def keeping_add(self, stats):
        kept.append(stats)
        add(self, stats)

    monkeypatch.setattr(PanopticEvaluator, "_add", keeping_add)
    growth, _ = _evaluate(setup, ["panoptic"], last=LEAK_LAST)
    assert growth["objects"] >= LEAK_IMAGES


def test_the_measurement_sees_a_dense_mask_kept_per_image(setup, monkeypatch):
    kept, process = [], PanopticEvaluator.process

    def keeping_process(self, pred_seg, *args, **kwargs):
        kept.append(pred_seg.copy())  # 48 x 48 int32, no container
        process(self, pred_seg, *args, **kwargs)

    monkeypatch.setattr(PanopticEvaluator, "process", keeping_process)
    growth, _ = _evaluate(setup, ["panoptic"], last=LEAK_LAST)
    assert growth["bytes"] > 64 * IMAGES + NOISE_BYTES  # the bound of a full window


def test_pq_pool_keeps_at_most_twice_its_workers_in_flight(setup):
    cfg, model, categories, items = setup
    image, target = items[0]
    seg, segments = infer(model, [image], cfg, categories, ["panoptic"])[-1][0]["panoptic"]
    is_thing = [c["isthing"] for c in categories]
    gt = masks_to_panoptic(target["masks"], target["labels"], target["is_crowd"], is_thing)
    pooled, alone = PanopticEvaluator(categories, workers=1), PanopticEvaluator(categories, 0)
    try:
        for image_id in range(12):
            pooled.process(seg, segments, *gt, image_id=image_id)
            alone.process(seg, segments, *gt, image_id=image_id)
            futures = sum(isinstance(o, Future) for o in gc.get_objects())
            assert len(pooled._pending) <= 2 and futures <= 2, "futures kept after use"
    finally:
        pooled_state = pooled.state()  # waits for the images in flight, closes the pool
    for key in ("iou_sum", "tp", "fp", "fn"):
        assert (pooled_state[key] == alone.state()[key]).all(), key


@pytest.mark.parametrize("task", ["panoptic", "instance"])
def test_predictor_writes_as_it_goes(setup, tmp_path, task):
    cfg, model, categories, items = setup
    sources = []
    for index, (image, _) in enumerate(items):
        sources.append(tmp_path / f"{index}.png")
        pixels = (image * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(sources[-1])
    paths = [sources[i % len(sources)] for i in range(LAST + BATCH)]  # written as 0_1.png, ...
    predictor = Predictor(model, cfg, categories, device="cpu")
    snapshots, done, predict = {}, [0], predictor.predict

    def sampled_predict(images, task=None):
        if done[0] in (FIRST, LAST):
            snapshots[done[0]] = _snapshot()
        done[0] += len(images)
        return predict(images, task)

    predictor.predict = sampled_predict
    tracemalloc.start()
    try:
        summary = write_predictions(
            predictor, paths, tmp_path / "out", task, BATCH, task == "panoptic", progress=False
        )
    finally:
        tracemalloc.stop()
    _assert_flat(_growth(snapshots), bytes_per_image=64)
    assert summary.predicted == len(paths)
    content = json.loads(next(iter(summary.files.values())).read_text())
    if task == "panoptic":
        assert [image["id"] for image in content["images"]] == unique_stems(paths)
        assert sum(len(a["segments_info"]) for a in content["annotations"]) > len(paths)
    else:
        assert {result["image_id"] for result in content} == set(unique_stems(paths))
    assert sorted(p.name for p in (tmp_path / "out").glob("*.json*")) == [*summary.files]


def test_streamed_json_is_what_json_dump_writes(tmp_path):
    annotations = [{"image_id": 1, "n": [1.5, None]}, {"image_id": 2, "name": "é"}]
    images = [{"id": 1}, {"id": 2}, {"id": 3}]
    categories = [{"id": 3, "name": "x"}]
    streamed = StreamedJson(
        tmp_path / "a.json", "annotations", ("images",), {"categories": categories}
    )
    streamed.add({"annotations": annotations[:1], "images": images[:2]})
    streamed.add({"annotations": [], "images": images[2:]})  # an image without annotations
    streamed.add({"annotations": annotations[1:]})
    # What closing appends to the temporary fits in the reserve it deletes first, with the
    # margin for block rounding to spare: it needs no free space.
    before = (tmp_path / "a.json.partial").stat().st_size
    reserve = (tmp_path / "a.json.reserve").stat().st_size
    streamed.close()
    expected = json.dumps({"annotations": annotations, "images": images, "categories": categories})
    assert (tmp_path / "a.json").read_text() == expected
    assert reserve - ((tmp_path / "a.json").stat().st_size - before) == RESERVE_MARGIN

    items = StreamedJson(tmp_path / "b.json")
    items.add({None: [{"score": 0.5}]})
    items.add({None: [[1, "two"], 3]})
    items.close()
    assert (tmp_path / "b.json").read_text() == json.dumps([{"score": 0.5}, [1, "two"], 3])

    empty = StreamedJson(tmp_path / "c.json", "annotations", ("images",), {"categories": []})
    empty.close()
    assert (tmp_path / "c.json").read_text() == json.dumps(
        {"annotations": [], "images": [], "categories": []}
    )

    discarded = StreamedJson(tmp_path / "d.json")
    discarded.add({None: [1]})
    discarded.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json", "c.json"]


def test_instance_state_is_compact(setup):
    cfg, model, categories, items = setup
    image, target = items[0]
    result = infer(model, [image], cfg, categories, ["instance"])[-1][0]["instance"]
    evaluator = InstanceEvaluator(categories)
    evaluator.process(0, target, result)
    (kept,) = evaluator.state()
    assert all(isinstance(rle, bytes) for rle in kept.gt_rles + kept.pred_rles)
    assert len(kept.pred_rles) == len(kept.pred_scores) == len(kept.pred_labels) > 0
