"""One table of many runs beside the paper's values, and the pictures of them.

    python tools/report.py output/sweeps/table4_annealing_synthetic --output docs/table4_synthetic
    python tools/report.py output/sweeps output/run1 --benchmark bench.jsonl --output report/

The runs: every run folder of a sweep (tools/sweep.py writes run.json into each) in or under
the folders given, and each folder given that is itself a training run's (results.json and
config.yaml). Checkpoint series (tools/evaluate_checkpoints.py) and periodic evaluations are
never taken for runs. A group is a sweep's run (<sweep>/<run>), its seeds averaged (mean ±
standard deviation), with the paper's row it names (configs/paper_results.yaml). Only runs
that are done (finished.json) are counted; the others are listed with their state. --benchmark
adds tools/benchmark.py JSON lines (params, GFLOPs, FPS), matched by their "run" key to a
group (<sweep>/<run> or <run>) or a run.

OUTPUT gets report.md and report.csv (the table, and the runs not counted), training_loss.png,
evaluation.png (each run's final metrics, a dot per seed), evaluation_curves.png (only when
runs were evaluated during training), confusion_<run>.png and per_class_iou.png (runs with a
semantic evaluation), accuracy_vs_speed.png (PQ against FPS or GFLOPs, with --benchmark lines
to place the runs), and report.json, which lists them: a later report into OUTPUT removes them
first. A non-empty OUTPUT without report.json is refused. Prints the table.
"""

import argparse
from pathlib import Path

from eomt.cli import ToolParser, run_tool
from eomt.report import write_report


def parse_args(argv=None):
    parser = ToolParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("folders", nargs="+", help="run folders, or folders holding them")
    parser.add_argument("--output", required=True, help="folder of the table and pictures")
    parser.add_argument("--benchmark", nargs="*", default=[], help="benchmark.py JSON lines")
    return parser.parse_args(argv)


def main(args) -> list[Path]:
    written, text = write_report(args.folders, args.output, args.benchmark)
    print(text)
    return written


if __name__ == "__main__":
    run_tool(main, parse_args)  # a missing folder, a foreign output: one line, exit 2
