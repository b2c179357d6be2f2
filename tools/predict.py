"""Segment images with a checkpoint (ours, the official release, or Hugging Face).

    python tools/predict.py --weights output/run/model_0088692.pth --input photo.jpg --output out
    python tools/predict.py --weights pytorch_model.bin --input "images/*.jpg" --output out \\
        --categories datasets/coco/annotations/panoptic_val2017.json --batch-size 8
    python tools/predict.py --weights delta.bin --base-weights dinov3_vitl16.safetensors \\
        --input images/ --output out --show-queries 4
    python tools/predict.py --weights model.pth --input datasets/coco/val2017 --output out \\
        --coco-json datasets/coco/annotations/panoptic_val2017.json
    python tools/predict.py --weights model.pth --input aerial/ --output out --tile 640
    python tools/predict.py --weights videomt.pth --video clip.mp4 --output out
    python tools/predict.py --weights videomt.pth --frames JPEGImages/0a2f3 --output out \\
        --task instance --video-id 17

Writes PNG/JSON predictions (COCO panoptic format for panoptic, COCO results for instance,
label PNGs for semantic) and overlay pictures; runs on the GPU when there is one. Outputs are
named by the image's file stem, which is also its image id (a string); with --coco-json they
take the JSON's image ids and file names, so that tools/evaluate.py scores them against it.
With --tile, images larger than a tile are predicted at full resolution in overlapping tiles.

--video (a file) and --frames (a folder of frames, in name order) take a VidEoMT checkpoint and
predict frame by frame, its queries carried over frames (ids stable: docs/video_prediction.md):
per-frame panoptic / semantic PNGs, YouTube-VIS results.json for instance, overlay.mp4 and
video.json (frames per second among it). Another model is refused.
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
from eomt.deploy.video import DEFAULT_MAX_TRACKS, write_video_predictions


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
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument(
        "--input",
        help="an image, a folder or a glob pattern (with --coco-json: "
        "the folder of the JSON's images)",
    )
    inputs.add_argument("--video", metavar="FILE", help="a video file (VidEoMT checkpoints)")
    inputs.add_argument(
        "--frames",
        metavar="DIR",
        help="a folder of a video's frames, in name order (VidEoMT checkpoints)",
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
    video = parser.add_argument_group("video (--video, --frames)")
    video.add_argument(
        "--max-tracks",
        type=_int_at_least(1),
        default=DEFAULT_MAX_TRACKS,
        metavar="N",
        help="instance: the N best tracks of the video in results.json (default: "
        f"{DEFAULT_MAX_TRACKS}, the authors' for YouTube-VIS)",
    )
    video.add_argument(
        "--video-id",
        type=_video_id,
        help="video_id of results.json (default: the file's or folder's stem); the dataset's "
        "id to score it against its ground truth",
    )
    video.add_argument(
        "--frame-rate",
        type=float,
        help="frames per second of overlay.mp4 (default: the file's; for --frames 24)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    check_runtime_arguments(parser, args)
    if args.tile is None and args.tile_overlap is not None:
        parser.error("--tile-overlap needs --tile")
    if args.tile is not None and args.show_queries:
        parser.error("--show-queries draws the untiled prediction: not with --tile")
    if args.video or args.frames:
        given = [
            flag
            for flag, value in (
                ("--tile", args.tile),
                ("--show-queries", args.show_queries),
                ("--coco-json", args.coco_json),
                # The stream calls the model's step, not the forward that --compile compiles.
                ("--compile", args.compile != "none"),
            )
            if value
        ]
        if given:
            parser.error(f"{' '.join(given)}: for images, not with --video or --frames")
    elif args.video_id is not None or args.frame_rate is not None:
        parser.error("--video-id and --frame-rate are for --video or --frames")
    if args.frame_rate is not None and args.frame_rate <= 0:
        parser.error(f"--frame-rate must be positive, got {args.frame_rate}")
    return args


def _video_id(text: str) -> int | str:
    """An argparse type: an integer id (YouTube-VIS's), else the text."""
    return int(text) if text.isdigit() else text


def main_video(args):
    predictor = predictor_from_arguments(args)
    summary = write_video_predictions(
        predictor,
        args.video or args.frames,
        args.output,
        task=args.task,
        overlay=not args.no_overlay,
        max_tracks=args.max_tracks,
        score_threshold=args.score_threshold,
        video_id=args.video_id,
        frame_rate=args.frame_rate,
        progress=not args.quiet,
    )
    precision = predictor.forward.describe()["precision"]
    print(
        f"{summary.describe()} -> {args.output} ({', '.join(summary.files)}); the model ran in "
        f"{precision} on {predictor.device}"
    )
    return summary


def main(args) -> PredictionSummary:
    if args.video or args.frames:
        return main_video(args)
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
