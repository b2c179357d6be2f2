"""Tiled prediction of a large image, measured: the first GRID x GRID synthetic val images
pasted into one picture (their ground truth alike), scored by PQ when each image is predicted
alone, when the picture is predicted in tiles at full resolution, and when it is shrunk to
the model's input in one pass (docs/serving.md, "Large images: tiled prediction").

    python datasets/prepare_synthetic.py --output datasets/synthetic
    python tools/benchmark_tiling.py --weights output/synthetic_tiny_panoptic/model_final.pth
"""

import argparse

from eomt.cli import ToolParser, run_tool
from eomt.deploy.tiling_benchmark import compare_tiling
from eomt.report import markdown
from eomt.weights import load_model


def parse_args(argv=None):
    parser = ToolParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--weights", required=True, help="a panoptic model of the synthetic data")
    parser.add_argument("--data", default="datasets/synthetic", help="the synthetic dataset")
    parser.add_argument("--grid", type=int, default=6, help="images per row and column")
    parser.add_argument("--tile", type=int, help="default: the model's input size")
    parser.add_argument(
        "--tile-overlap", type=float, default=0.25, help="a fraction of the tile (0.25)"
    )
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    return parser.parse_args(argv)


def main(args) -> list[dict]:
    model, cfg, categories = load_model(args.weights)
    rows = compare_tiling(
        model, cfg, categories, args.data, args.grid, args.tile, args.tile_overlap, args.device
    )
    print(markdown(list(rows[0]), [[str(value) for value in row.values()] for row in rows]))
    return rows


if __name__ == "__main__":
    run_tool(main, parse_args)
