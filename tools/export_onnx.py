"""Export EoMT's inference graph to ONNX and check it with onnxruntime against PyTorch.

    python tools/export_onnx.py --weights eomt.safetensors --output eomt.onnx
    python tools/export_onnx.py --weights pytorch_model.bin --output eomt.onnx --image photo.jpg
    python tools/export_onnx.py --weights eomt.safetensors --output eomt_fp16.onnx --precision fp16

The graph takes images (B, 3, H, W) in [0, 1] at the model's input size (resize and pad them
as eomt.inference.resize_and_pad does) and returns the final `mask_logits`
(B, K, H/4, W/4) and `class_logits` (B, K, C+1), with masked attention off as at inference.
Post-processing stays in Python: eomt.evaluation.postprocess takes these logits. The check runs
a random batch and a picture (--image, or a synthetic scene) through both. It passes when each
output's largest difference is at most --relative-tolerance of that output's largest logit
(default 1e-4; 1e-2 for --precision fp16, whose graph takes and returns float16 and holds
float16 weights, for GPU deployment) and the picture's semantic labels agree on at least
--min-agreement of its pixels (0.99). A graph that fails is renamed <output>.failed. The check
runs on onnxruntime's CUDA provider when it has one, else on the CPU.
"""

import argparse

from eomt.cli import USER_ERRORS, ToolParser, run_tool
from eomt.deploy.onnx_export import (
    DEFAULT_MIN_AGREEMENT,
    DEFAULT_RELATIVE_TOLERANCE,
    PRECISIONS,
    check,
    check_failures,
    check_inputs,
    export,
    onnx_provider,
    set_aside,
)
from eomt.weights import load_model


def parse_args(argv=None):
    parser = ToolParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--weights", required=True, help="checkpoint file or HF model folder")
    parser.add_argument("--output", required=True, help="the .onnx file to write")
    parser.add_argument("--base-weights", help="DINOv3 backbone file of official delta weights")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"))
    parser.add_argument("--image", help="a picture for the check (default: a synthetic scene)")
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument(
        "--precision", default="fp32", choices=sorted(PRECISIONS), help="of the graph"
    )
    parser.add_argument(
        "--relative-tolerance",
        type=float,
        help="largest difference allowed, as a fraction of the output's largest logit "
        "(default: 1e-4 fp32, 1e-2 fp16)",
    )
    parser.add_argument(
        "--min-agreement",
        type=float,
        default=DEFAULT_MIN_AGREEMENT,
        help="fraction of the picture's pixels whose semantic label must agree (default 0.99)",
    )
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime check")
    args = parser.parse_args(argv)
    if args.relative_tolerance is not None and not args.relative_tolerance > 0:
        parser.error(f"--relative-tolerance must be > 0, got {args.relative_tolerance:g}")
    if not 0 < args.min_agreement <= 1:
        parser.error(f"--min-agreement must be in (0, 1], got {args.min_agreement:g}")
    if args.no_check:
        for flag in ("image", "relative_tolerance"):
            if getattr(args, flag) is not None:
                parser.error(f"--{flag.replace('_', '-')} is for the check, which --no-check skips")
    return args


def main(args) -> dict:
    model, cfg, _ = load_model(args.weights, args.base_weights, args.image_size)
    image_size = tuple(cfg.input.image_size)
    inputs = None if args.no_check else check_inputs(image_size, args.image)  # --image read first
    path = export(model, args.output, image_size, opset=args.opset, precision=args.precision)
    print(
        f"wrote {path} (input images (B, 3, {image_size[0]}, {image_size[1]}) in [0, 1], "
        f"{args.precision})"
    )
    if args.no_check:
        return {}
    provider = onnx_provider()
    comparisons = check(model, path, inputs, provider)
    print(f"checked with onnxruntime ({provider}) against PyTorch float32:")
    for name, comparison in comparisons.items():
        print(f"  {name}: {comparison.describe()}")
    tolerance = args.relative_tolerance or DEFAULT_RELATIVE_TOLERANCE[args.precision]
    failures = check_failures(comparisons, tolerance, args.min_agreement)
    if failures:
        failed = set_aside(path)
        raise SystemExit(
            f"error: {path} failed its check ({'; '.join(failures)}); renamed to {failed}"
        )
    print(
        f"check passed: differences within {tolerance:g} of each output's scale, semantic "
        f"labels agreeing on at least {100 * args.min_agreement:g}% of the picture's pixels"
    )
    return comparisons


if __name__ == "__main__":
    run_tool(main, parse_args, user_errors=(*USER_ERRORS, ImportError))  # onnx not installed
