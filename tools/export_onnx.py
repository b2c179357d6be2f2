"""Export EoMT's inference graph to ONNX and check it with onnxruntime against PyTorch.

    python tools/export_onnx.py --weights eomt.safetensors --output eomt.onnx
    python tools/export_onnx.py --weights pytorch_model.bin --output eomt.onnx --image photo.jpg

The graph takes images (B, 3, H, W) in [0, 1] at the model's input size (resize and pad them
as eomt.inference.resize_and_pad does) and returns the final `mask_logits`
(B, K, H/4, W/4) and `class_logits` (B, K, C+1), with masked attention off as at inference.
Post-processing stays in Python: eomt.evaluation.postprocess takes these logits. The check runs
a random input and a real-looking one (--image, or a synthetic scene) through both and fails
when any logit differs by more than --tolerance (default 1e-3).
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn

from eomt.data import load_image
from eomt.data.synthetic import render_sample
from eomt.inference import resize_and_pad
from eomt.weights import load_model

OUTPUT_NAMES = ("mask_logits", "class_logits")


class InferenceGraph(nn.Module):
    """The final prediction of an EoMT with masked attention off, as two tensors."""

    def __init__(self, model):
        super().__init__()
        self.model = model.eval()
        self.model.masked_attn = "never"

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        prediction = self.model(images)[-1]
        return prediction["mask_logits"], prediction["class_logits"]


def export(model, path: str | Path, image_size, batch_size: int = 1, opset: int = 18) -> Path:
    """Write the inference graph with a dynamic batch dimension (creating the folder)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    graph = InferenceGraph(model)
    example = torch.rand(batch_size, 3, *image_size)
    torch.onnx.export(
        graph,
        (example,),
        str(path),
        input_names=["images"],
        output_names=list(OUTPUT_NAMES),
        dynamic_axes={"images": {0: "batch"}, **{name: {0: "batch"} for name in OUTPUT_NAMES}},
        opset_version=opset,
        dynamo=False,
    )
    return Path(path)


def check(model, path: str | Path, inputs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Largest |onnxruntime - PyTorch| over both outputs, per named input batch."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    graph = InferenceGraph(model)
    differences = {}
    for name, images in inputs.items():
        with torch.no_grad():
            expected = graph(images)
        got = session.run(list(OUTPUT_NAMES), {"images": images.numpy()})
        differences[name] = max(float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected))
    return differences


def check_inputs(image_size, image: str | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random batch of two and a real-looking image (a given photo or a synthetic scene)."""
    generator = torch.Generator().manual_seed(seed)
    if image:
        picture = load_image(image)
    else:
        pixels = render_sample(np.random.default_rng(seed))[0]
        picture = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    padded, _ = resize_and_pad(picture, tuple(image_size))
    return {
        "random": torch.rand(2, 3, *image_size, generator=generator),
        "real-looking": padded[None],
    }


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
    parser.add_argument("--tolerance", type=float, default=1e-3)
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime check")
    return parser.parse_args(argv)


def main(args) -> dict[str, float]:
    model, cfg, _ = load_model(args.weights, args.base_weights, args.image_size)
    image_size = tuple(cfg.input.image_size)
    path = export(model, args.output, image_size, opset=args.opset)
    print(f"wrote {path} (input images (B, 3, {image_size[0]}, {image_size[1]}) in [0, 1])")
    if args.no_check:
        return {}
    differences = check(model, path, check_inputs(image_size, args.image))
    for name, difference in differences.items():
        print(f"{name}: max |onnxruntime - PyTorch| = {difference:.2e}")
    worst = max(differences.values())
    if worst > args.tolerance:
        raise SystemExit(f"ONNX outputs differ by {worst:.2e} > tolerance {args.tolerance}")
    return differences


if __name__ == "__main__":
    main(parse_args())
