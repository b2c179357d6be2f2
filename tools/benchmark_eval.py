"""Throughput of the PQ evaluator on COCO-sized synthetic predictions, in memory or from files.

    python tools/benchmark_eval.py                          # 300 images, 0, 1 and 2 workers
    python tools/benchmark_eval.py --images 1000 --workers 0 4 8 --height 480 --width 640
    python tools/benchmark_eval.py --files /tmp/pq200 --images 200 --workers 1 2

Each image is a 640x480 ground truth of about 20 segments (133 classes, 80 of them things; void
along the segment borders and one crowd segment) with a prediction of about 25 segments that
moves the borders, splits and merges segments and mislabels some. A handful of such pairs are
made first and cycled through, so that only evaluation is timed. Per worker count: ``main loop``,
the images per second that ``process`` lets through (the bounded queue makes it wait when the
workers fall behind), ``end to end``, images per second until ``evaluate`` has returned, and
``main CPU``, the CPU time the calling process spends per image (what inference loses; it
includes sending the maps to the workers). ``--output-dir`` adds the writing of the predictions
as COCO panoptic PNGs and JSON.

``--files DIR``: PQ from files, as ``tools/evaluate.py panoptic`` computes it. The pairs, cycled
over ``--images`` images, are written once as COCO panoptic ground truth and predictions
(``DIR/gt.json``, ``DIR/gt/``, ``DIR/pred.json``, ``DIR/pred/``; kept if ``DIR/gt.json`` exists):
ground-truth ids are random colours, new for each image, as in COCO's PNGs; predicted ids are
1..N, as ``tools/predict.py`` writes them. Per worker count, the median of ``--rounds`` runs:
``fresh``, the seconds of ``tools/evaluate.py panoptic`` in a new process (interpreter, imports
and evaluation: what a user waits for), and ``in-process``, of ``evaluate_files`` in this one.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from eomt.evaluation import PanopticEvaluator
from eomt.evaluation.panoptic_io import MAX_SEGMENT_ID, write_panoptic_png
from eomt.tasks.panoptic import evaluate_files

REPO = Path(__file__).resolve().parents[1]

NUM_THINGS, NUM_STUFF = 80, 53


def coco_like_categories() -> list[dict]:
    return [
        {"id": index + 1, "name": f"class{index}", "isthing": int(index < NUM_THINGS)}
        for index in range(NUM_THINGS + NUM_STUFF)
    ]


def _nearest_seed(seeds: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest seed per pixel, and the gap to the second nearest (in pixels)."""
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    distances = np.stack([np.hypot(rows - r, cols - c) for r, c in seeds])
    nearest_two = np.partition(distances, 1, axis=0)[:2]
    return distances.argmin(axis=0), nearest_two[1] - nearest_two[0]


def synthetic_pair(rng: np.random.Generator, height: int, width: int, num_gt: int, num_pred: int):
    """(pred_seg, pred_segments, gt_seg, gt_segments) with contiguous labels, ids from 1."""
    num_classes = NUM_THINGS + NUM_STUFF
    seeds = rng.uniform([0, 0], [height, width], size=(num_gt, 2))
    nearest, gap = _nearest_seed(seeds, height, width)
    gt_seg = (nearest + 1).astype(np.int32)
    gt_seg[gap < 3] = 0  # void along the borders, as in COCO
    gt_classes = rng.integers(0, num_classes, size=num_gt)
    crowd = int(rng.integers(0, num_gt))
    gt_classes[crowd] = rng.integers(0, NUM_THINGS)
    gt_segments = [
        {"id": i + 1, "category_id": int(gt_classes[i]), "iscrowd": int(i == crowd)}
        for i in range(num_gt)
    ]

    # Prediction: the ground-truth seeds jittered (some dropped, i.e. merged into neighbours)
    # plus extra seeds that split segments; 15% of the segments get a wrong class.
    kept = rng.random(num_gt) < 0.9
    jittered = seeds[kept] + rng.normal(0, 15, size=(kept.sum(), 2))
    extra = rng.uniform([0, 0], [height, width], size=(num_pred - kept.sum(), 2))
    pred_nearest, _ = _nearest_seed(np.concatenate([jittered, extra]), height, width)
    source_classes = np.concatenate(
        [gt_classes[kept], rng.integers(0, num_classes, size=len(extra))]
    )
    wrong = rng.random(num_pred) < 0.15
    pred_classes = np.where(wrong, rng.integers(0, num_classes, size=num_pred), source_classes)
    present = np.unique(pred_nearest)
    pred_seg = np.zeros((height, width), dtype=np.int32)
    pred_segments = []
    for new_id, seed_index in enumerate(present.tolist(), start=1):
        pred_seg[pred_nearest == seed_index] = new_id
        pred_segments.append({"id": new_id, "category_id": int(pred_classes[seed_index])})
    return pred_seg, pred_segments, gt_seg, gt_segments


def _segments_info(segment_map: np.ndarray, segments: list[dict]) -> list[dict]:
    """COCO panoptic segments of a map: dataset category ids (label + 1); on the ground-truth
    side (segments with ``iscrowd``) also area and bbox, and no segment without pixels."""
    info = []
    for segment in segments:
        entry = {"id": segment["id"], "category_id": segment["category_id"] + 1}
        if "iscrowd" in segment:
            ys, xs = np.nonzero(segment_map == segment["id"])
            if ys.size == 0:
                continue
            bbox = [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1]
            entry.update(iscrowd=segment["iscrowd"], area=int(ys.size), bbox=bbox)
        info.append(entry)
    return info


def write_panoptic_files(root: Path, pairs: list, num_images: int, seed: int) -> None:
    """``num_images`` images of ``pairs`` (cycled) as COCO panoptic files under ``root``."""
    rng = np.random.default_rng(seed)
    described = [
        (pred_seg, _segments_info(pred_seg, pred_segments), gt_seg, _segments_info(gt_seg, gt))
        for pred_seg, pred_segments, gt_seg, gt in pairs
    ]
    for side in ("gt", "pred"):
        (root / side).mkdir(parents=True, exist_ok=True)
    gt_annotations, pred_annotations = [], []
    for image_id in range(1, num_images + 1):
        pred_seg, pred_info, gt_seg, gt_info = described[(image_id - 1) % len(described)]
        colour_ids = rng.choice(MAX_SEGMENT_ID, size=int(gt_seg.max()) + 1, replace=False) + 1
        colour_ids[0] = 0  # void
        file_name = f"{image_id:012d}.png"
        write_panoptic_png(root / "gt" / file_name, colour_ids[gt_seg])
        write_panoptic_png(root / "pred" / file_name, pred_seg)
        gt_segments = [{**entry, "id": int(colour_ids[entry["id"]])} for entry in gt_info]
        for annotations, segments in ((gt_annotations, gt_segments), (pred_annotations, pred_info)):
            annotations.append(
                {"image_id": image_id, "file_name": file_name, "segments_info": segments}
            )
    ground_truth = {"annotations": gt_annotations, "categories": coco_like_categories()}
    for name, content in (("gt", ground_truth), ("pred", {"annotations": pred_annotations})):
        with open(root / f"{name}.json", "w") as file:
            json.dump(content, file)


def time_files(root: Path, workers: int, rounds: int) -> dict:
    """Median seconds of PQ from the files under ``root``: a fresh tools/evaluate.py, and
    evaluate_files in this process."""
    paths = {name: str(root / name) for name in ("gt.json", "gt", "pred.json", "pred")}
    command = [
        sys.executable,
        str(REPO / "tools" / "evaluate.py"),
        "panoptic",
        *("--gt-json", paths["gt.json"], "--gt-dir", paths["gt"]),
        *("--pred-json", paths["pred.json"], "--pred-dir", paths["pred"]),
        *("--workers", str(workers), "--json"),
    ]
    # The tool imports this checkout's eomt, not an installed one.
    search_path = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(search_path)}
    fresh, in_process = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        output = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        fresh.append(time.perf_counter() - start)
        start = time.perf_counter()
        summary = evaluate_files(
            paths["gt.json"], paths["gt"], paths["pred.json"], paths["pred"], workers
        )
        in_process.append(time.perf_counter() - start)
    if json.loads(output.stdout)["All"] != summary["All"]:
        raise RuntimeError(f"tools/evaluate.py and evaluate_files disagree on {root}")
    return {
        "fresh": statistics.median(fresh),
        "in_process": statistics.median(in_process),
        "PQ": summary["All"]["PQ"],
    }


def run(pairs: list, num_images: int, workers: int, output_dir: str | None) -> dict:
    """Rates and main-process CPU time of one evaluation; the pool's start-up is timed too."""
    evaluator = PanopticEvaluator(coco_like_categories(), workers=workers, output_dir=output_dir)
    start, start_cpu = time.perf_counter(), time.process_time()
    for index in range(num_images):
        pred_seg, pred_segments, gt_seg, gt_segments = pairs[index % len(pairs)]
        evaluator.process(pred_seg, pred_segments, gt_seg, gt_segments, index, f"{index:012d}.jpg")
    loop_seconds = time.perf_counter() - start
    results = evaluator.evaluate()
    return {
        "loop_rate": num_images / loop_seconds,
        "total_rate": num_images / (time.perf_counter() - start),
        "cpu_ms": 1000 * (time.process_time() - start_cpu) / num_images,
        "PQ": results["PQ"],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=300, help="images per measurement")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--gt-segments", type=int, default=20)
    parser.add_argument("--pred-segments", type=int, default=25)
    parser.add_argument("--distinct", type=int, default=8, help="distinct image pairs to cycle")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output-dir", help="also write the predictions there (COCO panoptic PNGs and JSON)"
    )
    parser.add_argument("--files", type=Path, help="time PQ from COCO panoptic files there")
    parser.add_argument("--rounds", type=int, default=3, help="runs per figure with --files")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)

    def distinct_pairs() -> list:
        return [
            synthetic_pair(rng, args.height, args.width, args.gt_segments, args.pred_segments)
            for _ in range(args.distinct)
        ]

    if args.files is not None:
        if not (args.files / "gt.json").is_file():
            write_panoptic_files(args.files, distinct_pairs(), args.images, args.seed)
        images = len(json.loads((args.files / "gt.json").read_text())["annotations"])
        print(f"PQ from the COCO panoptic files of {images} images in {args.files}")
        print(f"{'workers':>7}  {'fresh s':>8}  {'in-process s':>12}  {'PQ':>8}")
        for workers in args.workers:
            figures = time_files(args.files, workers, args.rounds)
            print(
                f"{workers:>7}  {figures['fresh']:>8.2f}  {figures['in_process']:>12.2f}  "
                f"{figures['PQ']:>8.4f}"
            )
        return
    pairs = distinct_pairs()
    written = "written" if args.output_dir else "not written"
    print(f"{args.images} images of {args.width}x{args.height}, predictions {written}")
    print(f"{'workers':>7}  {'main loop img/s':>15}  {'end to end img/s':>16}  ", end="")
    print(f"{'main CPU ms/img':>15}  {'PQ':>8}")
    for workers in args.workers:
        figures = run(pairs, args.images, workers, args.output_dir)
        print(
            f"{workers:>7}  {figures['loop_rate']:>15.1f}  {figures['total_rate']:>16.1f}  "
            f"{figures['cpu_ms']:>15.2f}  {figures['PQ']:>8.4f}"
        )


if __name__ == "__main__":
    main()
