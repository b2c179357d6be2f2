"""Export EoMT's inference graph to ONNX and check it with onnxruntime against PyTorch.

    python tools/export_onnx.py --weights eomt.safetensors --output eomt.onnx
    python tools/export_onnx.py --weights pytorch_model.bin --output eomt.onnx --image photo.jpg
    python tools/export_onnx.py --weights eomt.safetensors --output eomt_fp16.onnx --precision fp16

The graph takes images (B, 3, H, W) in [0, 1] at the model's input size (resize and pad them
as eomt.inference.resize_and_pad does) and returns the final `mask_logits`
(B, K, H/4, W/4) and `class_logits` (B, K, C+1), with masked attention off as at inference.
Post-processing stays in Python: eomt.evaluation.postprocess takes these logits. The check runs
a random input and a real-looking one (--image, or a synthetic scene) through both and fails
when any logit differs by more than --tolerance (default 1e-3; 5e-2 for --precision fp16,
whose graph takes and returns float16 and holds float16 weights, for GPU deployment). The
check runs on onnxruntime's CUDA provider when it has one, else on the CPU.
"""

import argparse

from eomt.deploy.onnx_export import (
    DEFAULT_TOLERANCE,
    PRECISIONS,
    check,
    check_inputs,
    export,
    onnx_provider,
)
from eomt.weights import load_model


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--weights", required=True, help="checkpoint file or HF model folder")
    parser.add_argument("--output", required=True, help="the .onnx file to write")
    parser.add_argument("--base-weights", help="DINOv3 backbone file of official delta weights")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"))
    parser.add_argument("--image", help="a photo for the check (default: a synthetic scene)")
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument(
        "--precision", default="fp32", choices=sorted(PRECISIONS), help="of the graph"
    )
    parser.add_argument("--tolerance", type=float, help="default: 1e-3 fp32, 5e-2 fp16")
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime check")
    return parser.parse_args(argv)


def main(args) -> dict[str, float]:
    model, cfg, _ = load_model(args.weights, args.base_weights, args.image_size)
    image_size = tuple(cfg.input.image_size)
    path = export(model, args.output, image_size, opset=args.opset, precision=args.precision)
    print(
        f"wrote {path} (input images (B, 3, {image_size[0]}, {image_size[1]}) in [0, 1], "
        f"{args.precision})"
    )
    if args.no_check:
        return {}
    provider = onnx_provider()
    differences = check(model, path, check_inputs(image_size, args.image), provider)
    for name, difference in differences.items():
        print(f"{name}: max |onnxruntime ({provider}) - PyTorch| = {difference:.2e}")
    worst = max(differences.values())
    tolerance = args.tolerance or DEFAULT_TOLERANCE[args.precision]
    if worst > tolerance:
        raise SystemExit(f"ONNX outputs differ by {worst:.2e} > tolerance {tolerance}")
    return differences


if __name__ == "__main__":
    main(parse_args())
