"""Segment images with a checkpoint (ours, the official release, or Hugging Face).

    python tools/predict.py --weights output/run/model_0088692.pth --input photo.jpg --output out
    python tools/predict.py --weights pytorch_model.bin --input "images/*.jpg" --output out \\
        --categories datasets/coco/annotations/panoptic_val2017.json --batch-size 8
    python tools/predict.py --weights delta.bin --base-weights dinov3_vitl16.safetensors \\
        --input images/ --output out --show-queries 4
    python tools/predict.py --weights model.pth --input datasets/coco/val2017 --output out \\
        --coco-json datasets/coco/annotations/panoptic_val2017.json
    python tools/predict.py --weights model.pth --input aerial/ --output out --tile 640

Writes PNG/JSON predictions (COCO panoptic format for panoptic, COCO results for instance,
label PNGs for semantic) and overlay pictures; runs on the GPU when there is one. Outputs are
named by the image's file stem, which is also its image id (a string); with --coco-json they
take the JSON's image ids and file names, so that tools/evaluate.py scores them against it.
With --tile, images larger than a tile are predicted at full resolution in overlapping tiles.
"""

import argparse

from eomt.cli import ToolParser, run_tool
from eomt.deploy.predictor import (
    PredictionSummary,
    add_predictor_arguments,
    find_images,
    predictor_from_arguments,
    read_coco_images,
    write_predictions,
)
from eomt.deploy.runtime import check_runtime_arguments


def _int_at_least(minimum: int):
    """An argparse type: an integer >= `minimum` (argparse's error names the flag)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


def _overlap(text: str) -> int | float:
    """An argparse type: pixels (an integer) or a fraction of the tile (a number below 1)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected pixels or a fraction, got {text!r}") from None


def parse_args(argv=None):
    parser = ToolParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_predictor_arguments(parser)
    parser.add_argument(
        "--input",
        required=True,
        help="an image, a folder or a glob pattern (with --coco-json: "
        "the folder of the JSON's images)",
    )
    parser.add_argument("--output", required=True, help="folder for predictions and pictures")
    parser.add_argument(
        "--task",
        choices=("panoptic", "semantic", "instance"),
        help="default: the model's task",
    )
    parser.add_argument(
        "--coco-json",
        metavar="FILE",
        help="predict the images listed in this COCO panoptic or instance JSON (e.g. the ground "
        "truth), found under --input by file_name, with its image ids and file names; a listed "
        "image missing from the folder is a bad image (--bad-images)",
    )
    parser.add_argument(
        "--batch-size",
        type=_int_at_least(1),
        default=4,
        help="images per forward (with --tile: tiles per forward)",
    )
    parser.add_argument("--no-overlay", action="store_true", help="skip the overlay pictures")
    parser.add_argument(
        "--show-queries",
        type=_int_at_least(0),
        default=0,
        metavar="N",
        help="also draw what the N most confident queries predict at each query block "
        "with masked attention on",
    )
    parser.add_argument(
        "--score-threshold", type=float, default=0.5, help="instances drawn above this score"
    )
    parser.add_argument(
        "--bad-images",
        choices=("stop", "skip"),
        default="stop",
        help="an image that cannot be read stops the run (every image before it predicted "
        "and written), or is left out and listed in skipped_images.txt",
    )
    parser.add_argument(
        "--tile",
        type=_int_at_least(1),
        metavar="SIZE",
        help="predict images larger than SIZE x SIZE at full resolution in overlapping tiles "
        "(at most the model's input size), objects across tile borders joined",
    )
    parser.add_argument(
        "--tile-overlap",
        type=_overlap,
        metavar="PIXELS_OR_FRACTION",
        help="how much neighbouring tiles overlap: pixels (64) or a fraction of the tile "
        "(0.25, the default)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    check_runtime_arguments(parser, args)
    if args.tile is None and args.tile_overlap is not None:
        parser.error("--tile-overlap needs --tile")
    if args.tile is not None and args.show_queries:
        parser.error("--show-queries draws the untiled prediction: not with --tile")
    return args


def main(args) -> PredictionSummary:
    predictor = predictor_from_arguments(
        args,
        tile=args.tile,
        overlap=0.25 if args.tile_overlap is None else args.tile_overlap,
        tile_batch=args.batch_size,
    )
    if args.coco_json:
        paths, images = read_coco_images(args.coco_json, args.input)
    else:
        paths, images = find_images(args.input), None
    summary = write_predictions(
        predictor,
        paths,
        args.output,
        task=args.task,
        batch_size=args.batch_size,
        overlay=not args.no_overlay,
        show_queries=args.show_queries,
        score_threshold=args.score_threshold,
        progress=not args.quiet,
        bad_images=args.bad_images,
        images=images,
    )
    files = ", ".join(summary.files) or "per-image files"
    precision = predictor.forward.describe()["precision"]
    print(
        f"{summary.total} images: {summary.describe()} -> {args.output} ({files}); "
        f"the model ran in {precision}"
    )
    return summary


if __name__ == "__main__":
    run_tool(main, parse_args)
