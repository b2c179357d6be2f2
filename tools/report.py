"""One table of many runs beside the paper's values, and the pictures of them.

    python tools/report.py output/sweeps/table4_annealing_synthetic --output docs/table4_synthetic
    python tools/report.py output/run1 output/run2 --benchmark bench.jsonl --output report/

Finds every run folder (one holding results.json) under the given folders. Runs of a sweep
(tools/sweep.py) are grouped over their seeds (mean ± standard deviation) and carry the
paper's row they name (configs/paper_results.yaml). --benchmark adds tools/benchmark.py JSON
lines (params, GFLOPs, FPS), matched to a group or run by a "run" key added to the line.
Writes OUTPUT/report.md and report.csv, curves.png (training loss and evaluation metrics),
confusion_<group>.png and per_class_iou.png (runs with a semantic evaluation) and
accuracy_vs_speed.png (PQ against FPS, or GFLOPs, with the paper's points; only with
--benchmark lines to place the runs); prints the table.
"""

import argparse
import json
from pathlib import Path

from eomt.report import (
    draw_accuracy_vs_speed,
    draw_confusion,
    draw_curves,
    draw_per_class,
    find_runs,
    markdown,
    read_benchmarks,
    read_run,
    speed_points,
    table,
    write_csv,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("folders", nargs="+", help="run folders, or folders holding them")
    parser.add_argument("--output", required=True, help="folder of the table and pictures")
    parser.add_argument("--benchmark", nargs="*", default=[], help="benchmark.py JSON lines")
    return parser.parse_args(argv)


def main(args) -> list[Path]:
    runs = [read_run(folder) for folder in find_runs(args.folders)]
    benchmarks = read_benchmarks(args.benchmark)
    for run in runs:
        run.benchmark = benchmarks.get(run.group, benchmarks.get(run.name, {}))
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    header, rows = table(runs)
    text = markdown(header, rows)
    (output / "report.md").write_text(text + "\n")
    write_csv(output / "report.csv", header, rows)
    written = [
        output / "report.md",
        output / "report.csv",
        draw_curves(runs, output / "curves.png"),
    ]
    semantic = [run for run in runs if "confusion_matrix" in run.results.get("semantic", {})]
    for group in dict.fromkeys(run.group for run in semantic):
        first = next(run for run in semantic if run.group == group)
        written.append(draw_confusion(first, output / f"confusion_{group}.png"))
    if semantic:
        written.append(draw_per_class(semantic, output / "per_class_iou.png"))
    if speed_points(runs)[1]:  # a run of ours with PQ and a measured speed to place
        written.append(draw_accuracy_vs_speed(runs, output / "accuracy_vs_speed.png"))
    (output / "runs.json").write_text(
        json.dumps([{"run": r.name, "group": r.group, "folder": str(r.folder)} for r in runs])
    )
    print(text)
    return written


if __name__ == "__main__":
    main(parse_args())
