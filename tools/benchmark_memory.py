"""Resident memory of evaluation and prediction over many synthetic images.

    python tools/benchmark_memory.py                       # 1000 images, every run below
    python tools/benchmark_memory.py --runs evaluate:instance predict:panoptic --python
    python tools/benchmark_memory.py --images 200 --threads 1 --samples

Writes a synthetic dataset (--images val images, 128 to 192 pixels; kept for the next call) and
runs, each with the tiny model of configs/synthetic/eomt_tiny_panoptic.yaml at random init
(score and overlap thresholds at 0, so that it predicts segments): evaluate:TASK, the metric of
TASK through eomt.tasks.evaluate.evaluate as tools/train_net.py --eval-only does (a model of
that task; data loading in this process); predict:TASK, eomt.deploy.predictor.write_predictions over
the image files, with overlay pictures, as tools/predict.py does. One JSON line per run: the
peak RSS (including the metric computation at the end), the RSS after the first 100 images, at
the end of the loop and after the run, the growth per image in between (least-squares slope
of the samples from 100 images on) and their range, what the model
predicted per image, and with --python tracemalloc's figures (slower). Each run in a fresh
process (--same-process: all in this one).
"""

import argparse
import json
import multiprocessing
import os
import time
import tracemalloc
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from eomt.config import get_cfg
from eomt.data import generate_synthetic_dataset, synthetic_split_paths
from eomt.data.build import build_dataset, build_test_loader
from eomt.deploy.predictor import Predictor, find_images, write_predictions
from eomt.modeling import build_model
from eomt.tasks import get_task
from eomt.tasks.evaluate import build_evaluators, evaluate

MIB = 1 << 20
CONFIG = Path(__file__).resolve().parent.parent / "configs/synthetic/eomt_tiny_panoptic.yaml"


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
    """What the model predicted per image: the task's `prediction_unit`."""

    def __init__(self, task: str):
        self.task, self.images, self.items = get_task(task), 0, 0

    def add(self, result) -> None:
        self.images += 1
        self.items += self.task.count_predictions(result)

    def figures(self) -> dict:
        return {
            "predicted_per_image": round(self.items / max(self.images, 1), 2),
            "predicted": self.task.prediction_unit,
        }


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


def evaluation_run(cfg, every: int = 50, python: bool = False) -> dict:
    """Memory while `evaluate` computes the metric of `cfg.task` over the val split."""
    task = cfg.task
    model = random_model(cfg)
    dataset = build_dataset(cfg, train=False)
    trace, count = MemoryTrace(every, python), PredictionCount(task)
    evaluators = build_evaluators(cfg.test.metrics, dataset.categories, cfg.test)
    loader = _SampledLoader(build_test_loader(cfg, dataset), trace)
    start = time.perf_counter()
    trace.start()
    metrics = evaluate(
        model,
        loader,
        cfg,
        dataset.categories,
        None,
        show=False,
        evaluators=evaluators,
        on_image=lambda results, target: count.add(results[task]),
    )
    figures = trace.stop()
    record = {
        "run": f"evaluate {task}",
        "seconds": round(time.perf_counter() - start, 1),
        **count.figures(),
    }
    headline = get_task(task).headline[0]
    record[headline] = round(float(metrics[task][headline]), 3)
    if hasattr(evaluators[task], "kept_bytes"):  # the instance evaluator keeps its masks
        record.update(evaluators[task].kept_bytes())
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

    def sampled(done: int, results: list) -> None:
        for result in results:
            count.add(result)
        trace.maybe_sample(done)

    start = time.perf_counter()
    trace.start()
    write_predictions(
        predictor,
        paths,
        output_dir,
        task,
        cfg.test.batch_size,
        overlay,
        progress=False,
        on_batch=sampled,
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


RUNS = [
    f"{kind}:{task}"
    for kind in ("evaluate", "predict")
    for task in ("panoptic", "semantic", "instance")
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--images", type=int, default=1000, help="synthetic images")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=RUNS, metavar="RUN")
    parser.add_argument("--every", type=int, default=25, help="images between samples")
    parser.add_argument("--python", action="store_true", help="also trace with tracemalloc")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--samples", action="store_true", help="print the RSS samples too")
    parser.add_argument(
        "--output-dir", default="output/benchmark_memory", help="the data set and predictions"
    )
    parser.add_argument(
        "--same-process",
        action="store_true",
        help="run all in this process (default: each run in a fresh one)",
    )
    parser.add_argument("overrides", nargs="*", help="config overrides: key=value")
    return parser.parse_args(argv)


def main(args) -> None:
    root = Path(args.output_dir) / f"synthetic_{args.images}"
    prepare_images(root, args.images)
    run = run_one if args.same_process else run_in_new_process
    for name in args.runs:
        record = run(
            name, root, args.output_dir, args.overrides, args.every, args.python, args.threads
        )
        print(json_line(record, args.samples), flush=True)


if __name__ == "__main__":
    main(parse_args())
