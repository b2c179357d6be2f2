"""Resident memory of evaluation and prediction over many images (tools/benchmark_memory.py).

A run samples the process's resident set size (RSS, /proc/self/statm) and, if asked,
tracemalloc's traced Python memory every few images. It reports the peak RSS (VmHWM, reset at
the start of the run through /proc/self/clear_refs where the kernel allows it, so that it
includes the metric computation at the end), the RSS after the first 100 images, at the last
sample of the loop and once the run has returned, and the growth per image from the first to
the last sample of the loop (a least-squares slope). Evaluation goes through
`eomt.engine.inference.evaluate` on the loader of `eomt.data.build.build_test_loader`, as
`tools/train_net.py --eval-only` does; prediction through `eomt.predictor.write_predictions`,
as `tools/predict.py` does. Linux only.
"""

import json
import multiprocessing
import os
import sys
import time
import tracemalloc
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from eomt.config import get_cfg
from eomt.data import generate_synthetic_dataset, synthetic_split_paths
from eomt.data.build import build_dataset, build_test_loader
from eomt.engine import inference
from eomt.modeling import build_model
from eomt.predictor import Predictor, find_images, write_predictions

MIB = 1 << 20
CONFIG = Path(__file__).resolve().parent.parent / "configs/synthetic/eomt_tiny_panoptic.yaml"
WHAT_IS_COUNTED = {
    "panoptic": "segments",
    "instance": "instance masks with pixels",
    "semantic": "distinct labels",
}
HEADLINE = {"panoptic": "PQ", "semantic": "mIoU", "instance": "AP"}


def rss_bytes() -> int:
    """The process's resident set size now."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """The process's peak resident set size (VmHWM) since start or the last `reset_peak_rss`."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak_rss() -> bool:
    """Start VmHWM again from the current RSS; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


class MemoryTrace:
    """(images done, RSS, traced Python bytes) every `every` images of one run."""

    def __init__(self, every: int = 50, python: bool = False):
        self.every, self.python = every, python
        self.samples: list[tuple[int, int, int]] = []
        self._next = 0

    def start(self) -> None:
        if self.python:
            tracemalloc.start()
        self.peak_reset = reset_peak_rss()
        self.sample(0)

    def maybe_sample(self, done: int) -> None:
        if done >= self._next:
            self.sample(done)

    def sample(self, done: int) -> None:
        traced = tracemalloc.get_traced_memory()[0] if self.python else 0
        self.samples.append((done, rss_bytes(), traced))
        self._next = (done // self.every + 1) * self.every

    def stop(self, first: int = 100) -> dict:
        """The figures of a run that has returned (MiB, bytes per image); stops tracemalloc.

        Growth per image: the least-squares slope of the samples from the first at `first`
        images or more to the last of the loop (RSS moves in steps of the allocator's chunks,
        up and down, which the difference of two samples would take for growth).
        """
        peak = peak_rss_bytes()
        end_rss, (end_traced, peak_traced) = rss_bytes(), (0, 0)
        if self.python:
            end_traced, peak_traced = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        later = [s for s in self.samples if s[0] >= first] or self.samples[-1:]
        images = np.array([s[0] for s in later], dtype=np.float64)
        figures = {
            "peak_rss_mib": round(peak / MIB, 1),
            "peak_since": "run start" if self.peak_reset else "process start",
            "rss_start_mib": round(self.samples[0][1] / MIB, 1),
            "first_images": later[0][0],
            "rss_after_first_mib": round(later[0][1] / MIB, 1),
            "loop_images": later[-1][0],
            "rss_loop_end_mib": round(later[-1][1] / MIB, 1),
            "rss_range_after_first_mib": [
                round(min(s[1] for s in later) / MIB, 1),
                round(max(s[1] for s in later) / MIB, 1),
            ],
            "rss_end_mib": round(end_rss / MIB, 1),
            "rss_growth_bytes_per_image": _slope(images, [s[1] for s in later]),
        }
        if self.python:
            figures["python_growth_bytes_per_image"] = _slope(images, [s[2] for s in later])
            figures["python_loop_end_mib"] = round(later[-1][2] / MIB, 2)
            figures["python_end_mib"] = round(end_traced / MIB, 2)
            figures["python_peak_mib"] = round(peak_traced / MIB, 1)
        figures["samples_mib"] = [[n, round(rss / MIB, 1)] for n, rss, _ in self.samples]
        return figures


def _slope(x: np.ndarray, y: list[int]) -> int:
    """Least-squares slope of y over x, rounded; 0 for fewer than two points."""
    if len(x) < 2:
        return 0
    return round(float(np.polyfit(x, np.array(y, dtype=np.float64), 1)[0]))


class PredictionCount:
    """What the model predicted per image: see WHAT_IS_COUNTED."""

    def __init__(self, task: str):
        self.task, self.images, self.items = task, 0, 0

    def add(self, result) -> None:
        self.images += 1
        if self.task == "panoptic":
            self.items += len(result[1])
        elif self.task == "instance":
            self.items += int(result["masks"].flatten(1).any(1).sum())
        else:
            self.items += int(torch.unique(result).numel())

    def figures(self) -> dict:
        return {
            "predicted_per_image": round(self.items / max(self.images, 1), 2),
            "predicted": WHAT_IS_COUNTED[self.task],
        }


@contextmanager
def _watched_evaluate(count: PredictionCount, evaluators: dict):
    """While inside, `evaluate` counts its predictions and leaves its evaluators in
    `evaluators`."""
    infer, build_evaluators = inference.infer, inference.build_evaluators

    def counted_infer(*args, **kwargs):
        results = infer(*args, **kwargs)
        for result in results:
            count.add(result[count.task])
        return results

    def kept_evaluators(*args, **kwargs):
        evaluators.update(build_evaluators(*args, **kwargs))
        return evaluators

    inference.infer, inference.build_evaluators = counted_infer, kept_evaluators
    try:
        yield
    finally:
        inference.infer, inference.build_evaluators = infer, build_evaluators


class _SampledLoader:
    """The batches of `loader`, sampling memory before each and after the last."""

    def __init__(self, loader, trace: MemoryTrace):
        self.loader, self.trace, self.done = loader, trace, 0

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def skipped(self) -> list:
        """The loader's images left out under dataset.bad_samples=skip (`evaluate` reports them)."""
        return getattr(self.loader, "skipped", [])

    def __iter__(self):
        for images, targets in self.loader:
            self.trace.maybe_sample(self.done)
            yield images, targets
            self.done += len(images)
        self.trace.sample(self.done)


def synthetic_config(root, output_dir, task: str, overrides=()):
    """The tiny synthetic model (configs/synthetic/eomt_tiny_panoptic.yaml) for `task` on the val
    split of `root`, with thresholds at 0 so that a random-init model predicts segments."""
    return get_cfg(
        CONFIG,
        [
            f"task={task}",
            f"test.metrics=[{task}]",
            f"dataset.root={root}",
            f"output_dir={output_dir}",
            "test.score_threshold=0.0",
            "test.overlap_threshold=0.0",
            "test.num_vis=0",
            "test.batch_size=4",
            "dataloader.num_workers=0",  # everything in the process measured
            *overrides,
        ],
    )


def prepare_images(root, num_images: int, seed: int = 0) -> Path:
    """A synthetic dataset of `num_images` val images under `root` (kept if already there)."""
    generate_synthetic_dataset(root, num_train=0, num_val=num_images, seed=seed)
    return synthetic_split_paths(root, "val")["image_dir"]


def random_model(cfg, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(cfg).eval()


def kept_by_instance_evaluator(evaluator) -> dict:
    """Bytes the instance evaluator holds per image (its records, RLE strings and arrays)."""
    images = evaluator.images
    total = sys.getsizeof(images)
    masks = 0
    for image in images:
        total += (
            sys.getsizeof(image) + sys.getsizeof(image.gt_rles) + sys.getsizeof(image.pred_rles)
        )
        total += sum(map(sys.getsizeof, image.gt_rles + image.pred_rles))
        total += sum(sys.getsizeof(getattr(image, key)) for key in _ARRAYS)
        masks += len(image.gt_rles) + len(image.pred_rles)
    count = max(len(images), 1)
    return {
        "kept_bytes_per_image": round(total / count),
        "kept_masks_per_image": round(masks / count, 1),
        "kept_rle_bytes_per_mask": round(
            sum(len(rle) for i in images for rle in i.gt_rles + i.pred_rles) / max(masks, 1)
        ),
    }


_ARRAYS = ("gt_labels", "gt_crowd", "pred_scores", "pred_labels")


def evaluation_run(cfg, every: int = 50, python: bool = False) -> dict:
    """Memory while `evaluate` computes the metric of `cfg.task` over the val split."""
    task = cfg.task
    model = random_model(cfg)
    dataset = build_dataset(cfg, train=False)
    trace, count, evaluators = MemoryTrace(every, python), PredictionCount(task), {}
    loader = _SampledLoader(build_test_loader(cfg, dataset), trace)
    start = time.perf_counter()
    trace.start()
    with _watched_evaluate(count, evaluators):
        metrics = inference.evaluate(model, loader, cfg, dataset.categories, None, show=False)
    figures = trace.stop()
    record = {
        "run": f"evaluate {task}",
        "seconds": round(time.perf_counter() - start, 1),
        **count.figures(),
        HEADLINE[task]: round(float(metrics[task][HEADLINE[task]]), 3),
    }
    if task == "instance":
        record.update(kept_by_instance_evaluator(evaluators["instance"]))
    return {**record, **figures}


def prediction_run(
    cfg, image_dir, output_dir, every: int = 50, python: bool = False, overlay: bool = True
) -> dict:
    """Memory while `write_predictions` writes `cfg.task` results for the images of
    `image_dir` (with overlay pictures by default, as tools/predict.py)."""
    task = cfg.task
    categories = build_dataset(cfg, train=False).categories
    predictor = Predictor(random_model(cfg), cfg, categories, device="cpu")
    paths = find_images(image_dir)
    trace, count = MemoryTrace(every, python), PredictionCount(task)
    predict, done = predictor.predict, [0]

    def sampled_predict(images, task=None):
        trace.maybe_sample(done[0])
        results = predict(images, task)
        for result in results:
            count.add(result)
        done[0] += len(images)
        return results

    predictor.predict = sampled_predict
    start = time.perf_counter()
    trace.start()
    write_predictions(
        predictor, paths, output_dir, task, cfg.test.batch_size, overlay, progress=False
    )
    figures = trace.stop()
    return {
        "run": f"predict {task}",
        "seconds": round(time.perf_counter() - start, 1),
        **count.figures(),
        **figures,
    }


def run_one(run: str, root, output_dir, overrides=(), every=50, python=False, threads=None):
    """`run` ("evaluate:TASK" or "predict:TASK") on the synthetic data set at `root`."""
    if threads:
        torch.set_num_threads(threads)
    kind, task = run.split(":")
    cfg = synthetic_config(root, output_dir, task, overrides)
    if kind == "evaluate":
        return evaluation_run(cfg, every, python)
    image_dir = synthetic_split_paths(root, "val")["image_dir"]
    return prediction_run(cfg, image_dir, Path(output_dir) / f"predict_{task}", every, python)


def run_in_new_process(*args, **kwargs) -> dict:
    """`run_one` in a fresh process, so that no run inherits the heap of another."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(run_one, *args, **kwargs).result()


def json_line(record: dict, samples: bool = False) -> str:
    """One JSON line; the RSS samples only if asked."""
    if not samples:
        record = {key: value for key, value in record.items() if key != "samples_mib"}
    return json.dumps(record)
