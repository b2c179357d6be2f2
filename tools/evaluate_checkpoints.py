"""Evaluate every checkpoint of a training run (or every N-th) and draw the metrics against
the iteration.

    python tools/evaluate_checkpoints.py --run output/run1
    python tools/evaluate_checkpoints.py --run output/run1 --every 5 test.num_vis=8

Each checkpoint model_NNNNNNN.pth of the run folder (with --every N: the first, every N-th
after it, and the last) is evaluated as the trainer evaluates, with the run's config.yaml and
the key=value overrides. Written into the run folder: checkpoint_series.jsonl (one line per
checkpoint: its iteration and scalar metrics, named as in metrics.jsonl),
checkpoint_series.png (the headline metrics against the iteration) and
checkpoint_series/<checkpoint>/ (its results.json and the tasks' files). Checkpoints already
in checkpoint_series.jsonl are not evaluated again: call it again during or after training to
add the new ones.
"""

import argparse

from eomt.cli import ToolParser, run_tool
from eomt.engine.checkpoint_series import PLOT_FILE, SERIES_FILE, evaluate_series, format_series


def parse_args(argv=None):
    parser = ToolParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a training run's output_dir")
    parser.add_argument(
        "--every", type=int, default=1, help="every N-th checkpoint, and the last (default: all)"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides: key=value")
    return parser.parse_intermixed_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    series = evaluate_series(args.run, args.every, args.overrides)
    print(format_series(series))
    print(f"written: {args.run}/{SERIES_FILE}, {args.run}/{PLOT_FILE}")
    return series


if __name__ == "__main__":
    run_tool(main)
