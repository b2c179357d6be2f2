"""The ONNX deployment graph: EoMT's final prediction with masked attention off, exported in
float32 or float16 and checked with onnxruntime against PyTorch (`tools/export_onnx.py`)."""

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from eomt.data import load_image
from eomt.data.synthetic import render_sample
from eomt.evaluation.postprocess import semantic_inference
from eomt.inference import resize_and_pad

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


PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}
# The check's tolerance on the largest |onnxruntime - PyTorch float32| of an output, as a
# fraction of that output's scale (its largest |logit|): logits of a trained model reach 60,
# where float16's own rounding is about 3e-2.
DEFAULT_RELATIVE_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
# The post-processed masks must agree too: the semantic label of each pixel (argmax over
# classes of sum over queries of sigmoid(mask) x P(class)), the post-processing every task
# shares and one that moves continuously with the logits (a panoptic map also hinges on the
# 0.8 score threshold, where one query near it flips a whole segment). Rounding flips only
# near-ties, in a thin band along segment borders; 1% of the pixels is far above that band and
# far below what a wrong graph changes (whole regions).
DEFAULT_MIN_AGREEMENT = 0.99


def export(
    model,
    path: str | Path,
    image_size,
    batch_size: int = 1,
    opset: int = 18,
    precision: str = "fp32",
) -> Path:
    """Write the inference graph with a dynamic batch dimension (creating the folder), its
    weights, inputs and outputs in `precision`, checked by onnx's checker (shapes inferred);
    `model` itself is left as it is."""
    try:
        import onnx  # torch.onnx.export needs the onnx package too
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "the ONNX export needs onnx and onnxruntime: pip install -e '.[onnx]'"
        ) from error

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if getattr(model, "token_merging", None) is not None:
        raise ValueError(
            "token merging gives each image its own number of tokens, which a traced ONNX "
            "graph cannot hold: export the model with model.token_merging.enabled=false"
        )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    dtype = PRECISIONS[precision]
    graph = InferenceGraph(copy.deepcopy(model).to(dtype))
    example = torch.rand(batch_size, 3, *image_size, dtype=dtype)
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
    onnx.checker.check_model(str(path), full_check=True)
    return Path(path)


def onnx_provider() -> str:
    """onnxruntime's CUDA provider when this install has one, else the CPU's."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    return (
        "CUDAExecutionProvider" if "CUDAExecutionProvider" in available else "CPUExecutionProvider"
    )


class CheckInput(NamedTuple):
    images: torch.Tensor  # (B, 3, H, W) at the model's input size
    inner: tuple[int, int] | None  # the picture's (height, width) inside the padding; None: noise


@dataclass
class Comparison:
    """onnxruntime's outputs against PyTorch's in float32 for one input."""

    output: str  # the output of the largest relative difference
    difference: float  # its largest |onnxruntime - PyTorch|
    scale: float  # its largest |PyTorch logit|
    agreement: float | None  # the fraction of pixels of equal semantic label (pictures only)

    @property
    def relative(self) -> float:
        return self.difference / max(self.scale, 1e-12)

    def describe(self) -> str:
        text = (
            f"largest difference {self.difference:.2e} = {100 * self.relative:.3g}% of the "
            f"{self.output}' scale {self.scale:.3g}"
        )
        if self.agreement is not None:
            text += f"; semantic labels agree on {100 * self.agreement:.2f}% of pixels"
        return text


def check(
    model, path: str | Path, inputs: dict[str, CheckInput], provider: str | None = None
) -> dict[str, Comparison]:
    """onnxruntime against PyTorch float32 on each named input (cast to the graph's input
    type): per output the largest difference relative to that output's scale, and for a
    picture the agreement of the semantic labels of its pixels (at the mask logits' 1/4
    resolution, padding left out)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=[provider or onnx_provider()])
    input_type = np.float16 if session.get_inputs()[0].type == "tensor(float16)" else np.float32
    graph = InferenceGraph(copy.deepcopy(model).float())
    comparisons = {}
    for name, (images, inner) in inputs.items():
        with torch.no_grad():
            expected = graph(images.float())
        got = session.run(list(OUTPUT_NAMES), {"images": images.numpy().astype(input_type)})
        got = [torch.from_numpy(g.astype(np.float32)) for g in got]
        agreement = None
        if inner is not None:
            agreement = _label_agreement(got, expected, inner, images.shape[-2:])
        per_output = []
        for output, g, e in zip(OUTPUT_NAMES, got, expected):
            difference, scale = float((g - e).abs().max()), float(e.abs().max())
            per_output.append(Comparison(output.replace("_", " "), difference, scale, agreement))
        # The worst output (a NaN difference is the worst).
        comparisons[name] = max(per_output, key=_badness)
    return comparisons


def _badness(comparison: Comparison) -> float:
    relative = comparison.relative
    return math.inf if math.isnan(relative) else relative


def _label_agreement(got, expected, inner, size) -> float:
    """The fraction of the picture's pixels (first image) whose semantic label agrees."""
    labels = []
    for mask_logits, class_logits in (got, expected):
        height = math.ceil(inner[0] * mask_logits.shape[-2] / size[0])
        width = math.ceil(inner[1] * mask_logits.shape[-1] / size[1])
        scores = semantic_inference(mask_logits[0, :, :height, :width], class_logits[0])
        labels.append(scores.argmax(0))
    return float((labels[0] == labels[1]).float().mean())


def check_failures(
    comparisons: dict[str, Comparison], relative_tolerance: float, min_agreement: float
) -> list[str]:
    """Why the check failed, one phrase per input and criterion; [] when it passed."""
    found = []
    for name, comparison in comparisons.items():
        if not comparison.relative <= relative_tolerance:  # NaN fails too
            found.append(
                f"{name}: relative difference {comparison.relative:.2e} of the "
                f"{comparison.output} > {relative_tolerance:g}"
            )
        if comparison.agreement is not None and not comparison.agreement >= min_agreement:
            found.append(
                f"{name}: semantic labels agree on {100 * comparison.agreement:.2f}% of pixels "
                f"< {100 * min_agreement:g}%"
            )
    return found


def set_aside(path: str | Path) -> Path:
    """Rename a graph that failed its check to <name>.failed, where no *.onnx finds it."""
    failed = Path(f"{path}.failed")
    Path(path).replace(failed)
    return failed


def check_inputs(image_size, image: str | None = None, seed: int = 0) -> dict[str, CheckInput]:
    """A random batch of two, and a picture: the given image, named by its file name, or a
    synthetic scene."""
    generator = torch.Generator().manual_seed(seed)
    if image:
        picture, name = load_image(image), Path(image).name
    else:
        pixels = render_sample(np.random.default_rng(seed))[0]
        picture = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
        name = "synthetic scene"
    padded, inner = resize_and_pad(picture, tuple(image_size))
    return {
        "random batch": CheckInput(torch.rand(2, 3, *image_size, generator=generator), None),
        name: CheckInput(padded[None], inner),
    }
