"""What a model costs, as the paper reports it: parameters, GFLOPs and frames per second.

GFLOPs follow fvcore's convention (one fused multiply-add = one FLOP), counted by tracing the
inference forward (eval mode) at batch 1 on the config's input size. fvcore has no handle for
`aten::scaled_dot_product_attention`, which timm's ViTs call; `sdpa_flop_jit` counts its two
matrix products. Element-wise ops (add, mul, GELU, softmax, ...) stay uncounted, as in fvcore and
detectron2; each result lists them under `uncounted_ops`.

Semantic inference runs the model on every square window of an image, so its GFLOPs and FPS cover
all the windows of a typical validation image of the dataset.
"""

import math
import resource
import time
import warnings

import torch
from torch import nn

from eomt.inference import autocast_for, window_starts
from eomt.modeling import build_model

with warnings.catch_warnings():
    # fvcore decorates its focal losses with torch.jit.script, which recent torch deprecates.
    warnings.simplefilter("ignore", FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape

SDPA_OP = "aten::scaled_dot_product_attention"
# (height, width) of a typical validation image: semantic configs count its windows.
TYPICAL_IMAGE_SIZES = {"ade20k_semantic": (512, 683), "cityscapes_semantic": (1024, 2048)}
# Warm-up and timed iterations: many on a GPU as in the paper, a few on a CPU.
DEFAULT_ITERATIONS = {"cuda": (50, 500), "cpu": (2, 10)}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def sdpa_flop_jit(inputs: list, outputs: list) -> int:
    """fvcore handle for `scaled_dot_product_attention`: q @ k^T and attention @ v.

    q (..., Nq, D), k (..., Nk, D), v (..., Nk, Dv) -> prod(...) * Nq * Nk * (D + Dv)
    multiply-adds; softmax and scaling are element-wise and uncounted.
    """
    query, key, value = (get_shape(x) for x in inputs[:3])
    return math.prod(query[:-1]) * key[-2] * (query[-1] + value[-1])


@torch.no_grad()
def count_flops(model: nn.Module, images: torch.Tensor) -> dict:
    """fvcore FLOPs of `model(images)` in the model's current mode.

    Returns `flops` (total), `by_operator` {fvcore op kind: flops} and `uncounted_ops`
    {traced op: occurrences} of the ops no handle counts.
    """
    analysis = FlopCountAnalysis(model, images).set_op_handle(SDPA_OP, sdpa_flop_jit)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return {
        "flops": int(analysis.total()),
        "by_operator": {op: int(n) for op, n in sorted(analysis.by_operator().items())},
        "uncounted_ops": dict(sorted(analysis.unsupported_ops().items())),
    }


def crops_per_image(cfg, image_size: tuple[int, int] | None = None) -> tuple[int, tuple | None]:
    """How many model inputs one image takes at inference, and the image size that decided it.

    Panoptic and instance inference pad an image to one input. Semantic inference resizes the
    short side to the window and slides square windows along the long side; `image_size` (else
    the dataset's typical validation image) is the image whose windows are counted.
    """
    if cfg.task != "semantic":
        return 1, None
    if image_size is None:
        if cfg.dataset.name not in TYPICAL_IMAGE_SIZES:
            raise ValueError(
                f"semantic config with dataset.name '{cfg.dataset.name}': no typical image size "
                f"known (have {sorted(TYPICAL_IMAGE_SIZES)}); give the image size explicitly"
            )
        image_size = TYPICAL_IMAGE_SIZES[cfg.dataset.name]
    window = cfg.input.image_size[0]
    if cfg.input.image_size[1] != window:
        raise ValueError(f"semantic windows are square; input.image_size is {cfg.input.image_size}")
    long_side = round(max(image_size) * window / min(image_size))
    return len(window_starts(long_side, window)), tuple(image_size)


def measure_fps(
    model: nn.Module,
    input_shape: tuple[int, ...],
    device: torch.device,
    warmup: int,
    iterations: int,
    compile_model: bool = False,
) -> dict:
    """Forwards per second of `model` on random inputs of `input_shape` on `device`.

    CUDA: bf16 autocast, `torch.cuda.synchronize` before and after the timed loop, peak memory
    allocated by PyTorch. CPU: float32, peak resident memory of the whole process.
    """
    model = model.to(device).eval()
    if compile_model:
        model = torch.compile(model)
    images = torch.rand(input_shape, device=device)
    is_cuda = device.type == "cuda"
    if is_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad(), autocast_for(device, "bf16"):
        for _ in range(warmup):
            model(images)
        if is_cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(iterations):
            model(images)
        if is_cuda:
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    if is_cuda:
        return {
            "forwards_per_second": iterations / seconds,
            "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20,
            "device": torch.cuda.get_device_name(device),
            "precision": "bf16 autocast",
            "memory_measure": "torch.cuda.max_memory_allocated",
        }
    return {
        "forwards_per_second": iterations / seconds,
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10,  # KiB
        "device": "cpu",
        "precision": "float32",
        "memory_measure": "peak resident memory of the whole process (ru_maxrss)",
    }


def benchmark(
    cfg,
    flops: bool = True,
    fps: bool = False,
    device: str = "cpu",
    batch_size: int = 1,
    compile_model: bool = False,
    image_size: tuple[int, int] | None = None,
    warmup: int | None = None,
    iterations: int | None = None,
) -> dict:
    """Params, and GFLOPs and FPS if asked, of the model `cfg` describes, with random weights.

    Without `flops` and `fps` the model is built on the meta device (no memory, no init).
    FLOPs are counted on the CPU in float32; FPS runs on `device`.
    """
    torch_device = torch.device(device)
    if fps and torch_device.type not in DEFAULT_ITERATIONS:
        raise ValueError(f"FPS device must be one of {sorted(DEFAULT_ITERATIONS)}, got '{device}'")
    if fps and torch_device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("FPS on device 'cuda' asked for, but CUDA is not available")
    crops, crop_image_size = crops_per_image(cfg, image_size)
    height, width = cfg.input.image_size
    result = {"task": cfg.task, "input_size": [height, width], "crops_per_image": crops}
    if crop_image_size is not None:
        result["crops_of_image_size"] = list(crop_image_size)
    if not (flops or fps):
        with torch.device("meta"):
            result["params"] = count_parameters(build_model(cfg, backbone_weights=False))
        return result
    model = build_model(cfg, backbone_weights=False).eval()
    result["params"] = count_parameters(model)
    if flops:
        counted = count_flops(model, torch.rand(1, 3, height, width))
        result["gflops"] = round(crops * counted["flops"] / 1e9, 2)
        result["gflops_per_crop"] = round(counted["flops"] / 1e9, 2)
        result["gflops_by_operator"] = {
            op: round(crops * n / 1e9, 3) for op, n in counted["by_operator"].items()
        }
        result["uncounted_ops"] = counted["uncounted_ops"]
        result["flop_counter"] = (
            "fvcore (1 multiply-add = 1 FLOP), eval forward at batch 1, float32 on CPU, "
            "scaled_dot_product_attention counted as q@k^T + attn@v"
        )
    if fps:
        default_warmup, default_iterations = DEFAULT_ITERATIONS[torch_device.type]
        warmup = default_warmup if warmup is None else warmup
        iterations = default_iterations if iterations is None else iterations
        input_shape = (batch_size * crops, 3, height, width)
        timing = measure_fps(model, input_shape, torch_device, warmup, iterations, compile_model)
        result.update(
            fps=round(batch_size * timing["forwards_per_second"], 2),
            latency_ms=round(1000 / timing["forwards_per_second"], 2),
            peak_memory_mb=round(timing["peak_memory_mb"], 1),
            device=timing["device"],
            batch_size=batch_size,
            warmup=warmup,
            iterations=iterations,
            precision=timing["precision"],
            compiled=compile_model,
            fps_measure=(
                f"images per second over {iterations} timed forwards after {warmup} warm-up "
                f"forwards, each of {batch_size} image(s) x {crops} crop(s), model forward only"
            ),
            memory_measure=timing["memory_measure"],
        )
        if torch_device.type == "cpu":
            result["note"] = "CPU run: few iterations, float32; not comparable with the paper's FPS"
    return result
