"""The ONNX deployment graph: EoMT's final prediction with masked attention off, exported in
float32 or float16 and checked with onnxruntime against PyTorch (`tools/export_onnx.py`)."""

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from eomt.data import load_image
from eomt.data.synthetic import render_sample
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
DEFAULT_TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2}


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
    import onnx  # torch.onnx.export needs the onnx package too

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
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


def check(
    model, path: str | Path, inputs: dict[str, torch.Tensor], provider: str | None = None
) -> dict[str, float]:
    """Largest |onnxruntime - PyTorch float32| over both outputs, per named input batch; the
    inputs are cast to the graph's input type."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=[provider or onnx_provider()])
    input_type = np.float16 if session.get_inputs()[0].type == "tensor(float16)" else np.float32
    graph = InferenceGraph(copy.deepcopy(model).float())
    differences = {}
    for name, images in inputs.items():
        with torch.no_grad():
            expected = graph(images.float())
        got = session.run(list(OUTPUT_NAMES), {"images": images.numpy().astype(input_type)})
        differences[name] = max(
            float(np.abs(g.astype(np.float32) - e.numpy()).max()) for g, e in zip(got, expected)
        )
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
