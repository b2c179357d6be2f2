"""What a model costs, as the paper reports it: parameters, GFLOPs and frames per second.

GFLOPs follow fvcore's convention (one fused multiply-add = one FLOP), counted by tracing the
inference forward (eval mode) at batch 1 on the config's input size. fvcore has no handle for
`aten::scaled_dot_product_attention`, which timm's ViTs call; `sdpa_flop_jit` counts its two
matrix products. Element-wise ops (add, mul, GELU, softmax, ...) stay uncounted, as in fvcore and
detectron2; each result lists them under `uncounted_ops`.

Semantic inference runs the model on every square window of an image, so its GFLOPs and FPS cover
all the windows of a typical validation image of the dataset.

VidEoMT (model.name videomt) is counted and timed per frame of a video: one call of its
streaming step (`VideoStep`), a frame and the queries carried from the frame before in, the
frame's prediction and the next frame's queries out; a video's frames are predicted whole, one
input per frame, whatever the task.
"""

import math
import resource
import statistics
import time
import warnings

import torch
from torch import nn

from eomt.deploy.runtime import FastForward, default_autocast
from eomt.inference import autocast_for, window_starts
from eomt.modeling import build_model, count_trainable

with warnings.catch_warnings():
    # fvcore decorates its focal losses with torch.jit.script, which recent torch deprecates.
    warnings.simplefilter("ignore", FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape

SDPA_OP = "aten::scaled_dot_product_attention"
# (height, width) of a typical validation image: semantic configs count its windows.
TYPICAL_IMAGE_SIZES = {
    "ade20k_semantic": (512, 683),
    "cityscapes_semantic": (1024, 2048),
    "cityscapes_categories": (1024, 2048),
}
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


class VideoStep(nn.Module):
    """VidEoMT's streaming step as a module called like an image model: frames (B, 3, H, W),
    one per video, with the queries a previous frame carried over (a buffer: the learned
    queries, so that every call costs what a frame after the first costs) -> [{mask_logits,
    class_logits, queries}], `queries` those of the next frame. The buffer is not updated, so
    that repeated calls compute the same function (for timing and error against float32)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        carried = model.queries.weight.detach().clone()[None]
        self.register_buffer("carried", carried, persistent=False)

    def forward(self, frames: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        queries = self.carried.expand(frames.shape[0], -1, -1)
        prediction, next_queries = self.model.step(frames, queries)
        return [{**prediction, "queries": next_queries}]


def build_timed_model(cfg) -> nn.Module:
    """The model `cfg` describes (random weights, eval) as its inference is timed: VidEoMT as
    its streaming step (`VideoStep`), any other as itself."""
    model = build_model(cfg, backbone_weights=False).eval()
    return VideoStep(model) if cfg.model.name == "videomt" else model


def crops_per_image(cfg, image_size: tuple[int, int] | None = None) -> tuple[int, tuple | None]:
    """How many model inputs one image takes at inference, and the image size that decided it.

    Panoptic and instance inference pad an image to one input. Semantic inference resizes the
    short side to the window and slides square windows along the long side; `image_size` (else
    the dataset's typical validation image) is the image whose windows are counted.
    """
    if cfg.task != "semantic" or cfg.model.name == "videomt":  # a video frame: one input
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


def time_forwards(forward, images: torch.Tensor, warmup: int, iterations: int) -> list[float]:
    """Milliseconds of each of `iterations` forwards after `warmup` untimed ones.

    CUDA: an event pair around each forward, read after one synchronisation at the end, so
    that no host synchronisation falls between forwards. CPU: the wall clock of each forward.
    """
    with torch.no_grad():
        for _ in range(warmup):
            forward(images)
        if not images.is_cuda:
            times = []
            for _ in range(iterations):
                start = time.perf_counter()
                forward(images)
                times.append(1000 * (time.perf_counter() - start))
            return times
        torch.cuda.synchronize(images.device)
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(iterations)
        ]
        for start, end in events:
            start.record()
            forward(images)
            end.record()
        torch.cuda.synchronize(images.device)
        return [start.elapsed_time(end) for start, end in events]


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: the peak PyTorch allocated since the last reset. CPU: the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB


def memory_measure(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated"
    return "peak resident memory of the whole process (ru_maxrss)"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def relative_error(outputs: list[dict], reference: list[dict]) -> float:
    """Largest ||a - b|| / ||b|| over the logits of the final prediction."""
    got, expected = outputs[-1], reference[-1]
    return max(
        float((got[key].float() - expected[key].float()).norm() / expected[key].float().norm())
        for key in expected
    )


def measure_fps(
    model: nn.Module,
    images: torch.Tensor,
    warmup: int,
    iterations: int,
    compile_mode: str = "none",
    sdpa_backend: str = "auto",
    weights_dtype: str = "fp32",
    autocast: str = "none",
) -> dict:
    """Forwards per second of `model` on `images` (on their device) with the `FastForward`
    options, from the median of `iterations` timed forwards after `warmup` (the first,
    which compiles, timed apart as `first_forward_s`), and `relative_error`: the final
    prediction's largest relative L2 error against the eager float32 forward of `model`.

    `model` (float32) is moved, cast and compiled in place: pass a copy to keep it.
    """
    device = images.device
    model = model.to(device).eval()
    with torch.no_grad():
        reference = model(images)
    forward = FastForward(model, compile_mode, sdpa_backend, weights_dtype, autocast)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with torch.no_grad():
        outputs = forward(images)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first_forward_s = time.perf_counter() - start
    times = time_forwards(forward, images, max(warmup - 1, 0), iterations)
    median_ms = statistics.median(times)
    return {
        "forwards_per_second": 1000 / median_ms,
        "median_ms": median_ms,
        "mean_ms": statistics.fmean(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "warmup": warmup,
        "iterations": iterations,
        "first_forward_s": first_forward_s,
        "relative_error": relative_error(outputs, reference),
        "peak_memory_mb": peak_memory_mb(device),
        "device": device_name(device),
        **forward.describe(),
        "memory_measure": memory_measure(device),
    }


def achieved_tflops(images_per_second: float, multiply_adds_per_image: int) -> float:
    """The TFLOP/s a throughput does: 2 FLOPs per multiply-add (fvcore counts multiply-adds),
    as `matmul_rate` counts them."""
    return images_per_second * 2 * multiply_adds_per_image / 1e12


def random_targets(
    batch: int, size: tuple[int, int], num_classes: int, per_image: int, generator
) -> list[dict]:
    """Per image, `per_image` random rectangles as masks (N, H, W) with random labels."""
    height, width = size
    targets = []
    for _ in range(batch):
        corners = torch.rand(per_image, 4, generator=generator)
        rows = torch.arange(height)[None, :, None] / height
        cols = torch.arange(width)[None, None, :] / width
        top, left = corners[:, 0:1, None] * 0.7, corners[:, 1:2, None] * 0.7
        bottom, right = (
            top + 0.1 + 0.2 * corners[:, 2:3, None],
            left + 0.1 + 0.2 * corners[:, 3:4, None],
        )
        masks = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
        labels = torch.randint(0, num_classes, (per_image,), generator=generator)
        targets.append({"masks": masks, "labels": labels})
    return targets


def measure_training(
    cfg, device: torch.device, batch_size: int, warmup: int, steps: int, masks_per_image: int = 8
) -> dict:
    """Training steps per second of the model `cfg` describes, with masked attention on in
    every query block (as at the start of annealing), bf16 autocast on CUDA, the config's
    loss and optimizer, on random images and rectangle masks; random weights.

    Each step is synchronised; `loss_fraction` is the share of a step spent in the loss's
    forward (matching included), what the matcher and the loss cost the step.
    """
    from eomt.engine.solver import build_optimizer
    from eomt.modeling import build_criterion

    model = build_model(cfg, backbone_weights=False).to(device).train()
    if hasattr(model, "attn_mask_probs"):
        model.attn_mask_probs.fill_(1.0)
    criterion = build_criterion(cfg).to(device)
    optimizer = build_optimizer(model, cfg.solver.lr, cfg.solver.weight_decay, cfg.solver.llrd)
    generator = torch.Generator().manual_seed(0)
    size = tuple(cfg.input.image_size)
    images = torch.rand(batch_size, 3, *size, generator=generator).to(device)
    targets = [
        {key: value.to(device) for key, value in target.items()}
        for target in random_targets(
            batch_size, size, cfg.model.num_classes, masks_per_image, generator
        )
    ]

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_times, loss_times, losses = [], [], []
    for step in range(warmup + steps):
        synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast_for(device, "bf16"):
            predictions = model(images)
        synchronize()
        loss_start = time.perf_counter()
        loss = criterion(predictions, targets)["loss"]
        synchronize()
        loss_seconds = time.perf_counter() - loss_start
        loss.backward()
        optimizer.step()
        synchronize()
        if step >= warmup:
            step_times.append(time.perf_counter() - start)
            loss_times.append(loss_seconds)
            losses.append(float(loss))
    median_step = statistics.median(step_times)
    return {
        "iterations_per_second": 1 / median_step,
        "images_per_second": batch_size / median_step,
        "median_step_ms": 1000 * median_step,
        "loss_fraction": statistics.median(loss_times) / median_step,
        "batch_size": batch_size,
        "steps": steps,
        "warmup": warmup,
        "losses": losses,
        "peak_memory_mb": peak_memory_mb(device),
        "device": device_name(device),
        "precision": "bf16 autocast" if device.type == "cuda" else "float32",
        "memory_measure": memory_measure(device),
    }


def matmul_rate(device: torch.device, size: int, iterations: int = 10) -> dict:
    """TFLOP/s (2 FLOPs per multiply-add) of `size`^3 matrix products on random data: bf16 on
    CUDA, float32 on CPU; the ceiling that throughput is reported against."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator).to(device, dtype) for _ in range(2))
    times = time_forwards(lambda x: x @ b, a, warmup=3, iterations=iterations)
    return {
        "tflops": 2 * size**3 / (statistics.median(times) / 1000) / 1e12,
        "size": size,
        "dtype": str(dtype).removeprefix("torch."),
        "iterations": iterations,
        "device": device_name(device),
    }


def benchmark(
    cfg,
    flops: bool = True,
    fps: bool = False,
    device: str = "cpu",
    batch_size: int = 1,
    compile_mode: str = "none",
    sdpa_backend: str = "auto",
    weights_dtype: str = "fp32",
    autocast: str | None = None,
    image_size: tuple[int, int] | None = None,
    warmup: int | None = None,
    iterations: int | None = None,
) -> dict:
    """Params, and GFLOPs and FPS if asked, of the model `cfg` describes, with random weights.

    Without `flops` and `fps` the model is built on the meta device (no memory, no init).
    FLOPs are counted on the CPU in float32; FPS runs on `device` with the `FastForward`
    options `compile_mode`, `sdpa_backend`, `weights_dtype` and `autocast` (None: bf16 for
    float32 weights on CUDA, the paper's AMP, else none).
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
            model = build_model(cfg, backbone_weights=False)
        result["params"] = count_parameters(model)
        result["params_trainable"] = count_trainable(model)[0]
        return result
    model = build_timed_model(cfg)
    result["params"] = count_parameters(model)
    result["params_trainable"] = count_trainable(model)[0]
    video = cfg.model.name == "videomt"
    if video:
        result["per"] = "video frame: VidEoMT's streaming step, carried queries in and out"
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
        generator = torch.Generator().manual_seed(0)
        images = torch.rand(batch_size * crops, 3, height, width, generator=generator)
        if autocast is None:
            autocast = default_autocast(torch_device, weights_dtype, "bf16")
        timing = measure_fps(
            model,
            images.to(torch_device),
            warmup,
            iterations,
            compile_mode,
            sdpa_backend,
            weights_dtype,
            autocast,
        )
        result.update(
            fps=round(batch_size * timing["forwards_per_second"], 2),
            latency_ms=round(timing["median_ms"], 3),
            mean_latency_ms=round(timing["mean_ms"], 3),
            first_forward_s=round(timing["first_forward_s"], 2),
            peak_memory_mb=round(timing["peak_memory_mb"], 1),
            device=timing["device"],
            torch=torch.__version__,
            batch_size=batch_size,
            warmup=warmup,
            iterations=iterations,
            precision=timing["precision"],
            relative_error=timing["relative_error"],
            compile_mode=compile_mode,
            sdpa_backend=sdpa_backend,
            weights_dtype=weights_dtype,
            autocast=autocast,
            fps_measure=(
                f"{'video frames' if video else 'images'} per second from the median of "
                f"{iterations} timed forwards after {warmup} warm-up forwards, each of "
                f"{batch_size} {'frame(s) of as many videos' if video else 'image(s)'} x "
                f"{crops} crop(s), model forward only"
            ),
            memory_measure=timing["memory_measure"],
        )
        if torch_device.type == "cpu":
            result["note"] = "CPU run: few iterations; not comparable with the paper's FPS"
    return result


# fvcore's operator kinds (by_operator keys) and the profiler's aten ops of each kind of work;
# whatever is in neither (norms, activations, additions, copies) is "other".
FLOP_KINDS = {
    "linear": ("linear", "addmm", "matmul", "mm", "bmm", "einsum"),
    "attention": ("scaled_dot_product_attention",),
    "convolution": ("conv",),
}
PROFILED_OPS = {
    "linear": (
        "aten::linear",
        "aten::addmm",
        "aten::matmul",
        "aten::mm",
        "aten::bmm",
        "aten::einsum",
    ),
    "attention": ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product"),
    "convolution": ("aten::conv", "aten::_conv", "aten::mkldnn_conv"),
}
KINDS = (*FLOP_KINDS, "other")


def flop_kind(operator: str) -> str:
    """The kind of an fvcore operator name: linear, attention, convolution or other."""
    return next((kind for kind, ops in FLOP_KINDS.items() if operator in ops), "other")


def profiled_kind(name: str) -> str | None:
    """The kind of a profiled aten op (prefix match), None for the ops of "other"."""
    return next(
        (kind for kind, prefixes in PROFILED_OPS.items() if name.startswith(prefixes)), None
    )


def kind_times_ms(events) -> dict:
    """Milliseconds of CPU time per kind in profiler `events`: each outermost op of a kind
    (one whose callers are of no kind) counts with its inclusive time, so an op and the ops it
    calls (aten::linear -> aten::addmm) count once and no two kinds overlap."""
    times = dict.fromkeys(FLOP_KINDS, 0.0)
    for event in events:
        kind = profiled_kind(event.name)
        if kind is None:
            continue
        parent = event.cpu_parent
        while parent is not None and profiled_kind(parent.name) is None:
            parent = parent.cpu_parent
        if parent is None:
            times[kind] += event.cpu_time_total / 1000
    return times


def cpu_profile(cfg, warmup: int = 1, iterations: int = 2, matmul_size: int = 2048) -> dict:
    """Where the CPU time of one inference forward goes, against the machine's matmul rate.

    For the model `cfg` describes (random weights, eval, batch 1 at the input size, float32):
    fvcore's FLOPs (multiply-adds) by kind (linear: linear layers and other matrix products;
    attention: scaled_dot_product_attention's two products; convolution; other: the rest
    fvcore counts, e.g. LayerNorm), the CPU time of each kind from torch.profiler over
    `iterations` forwards after `warmup` (the outermost ops of each kind, inclusive times;
    "other" is the rest of the forward's wall clock), and each kind's achieved GFLOP/s
    (2 FLOPs per multiply-add) as a fraction of `matmul_rate`, the higher of its measures just
    before and just after the forwards (a load from other processes lowers either).
    """
    from torch.profiler import ProfilerActivity, profile

    model = build_timed_model(cfg)
    height, width = cfg.input.image_size
    images = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    counted = count_flops(model, images)
    flops = dict.fromkeys(KINDS, 0)
    for operator, n in counted["by_operator"].items():
        flops[flop_kind(operator)] += n
    rates = [matmul_rate(torch.device("cpu"), matmul_size)["tflops"]]
    with torch.no_grad():
        for _ in range(warmup):
            model(images)
        forward_ms = []
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            for _ in range(iterations):
                start = time.perf_counter()
                model(images)
                forward_ms.append(1000 * (time.perf_counter() - start))
    rates.append(matmul_rate(torch.device("cpu"), matmul_size)["tflops"])
    times = {kind: ms / iterations for kind, ms in kind_times_ms(profiler.events()).items()}
    mean_forward_ms = statistics.fmean(forward_ms)
    times["other"] = mean_forward_ms - sum(times.values())
    peak_gflops = 1000 * max(rates)
    kinds = {}
    for kind in KINDS:
        achieved = 2 * flops[kind] / 1e9 / (times[kind] / 1000) if times[kind] > 0 else 0.0
        kinds[kind] = {
            "flops": flops[kind],
            "gflops": round(flops[kind] / 1e9, 3),
            "ms": round(times[kind], 2),
            "time_fraction": round(times[kind] / mean_forward_ms, 4),
            "achieved_gflops_per_s": round(achieved, 2),
            "fraction_of_matmul_rate": round(achieved / peak_gflops, 4),
        }
    return {
        "task": cfg.task,
        "input_size": [height, width],
        "flops": counted["flops"],
        "gflops": round(counted["flops"] / 1e9, 3),
        "forward_ms": round(mean_forward_ms, 2),
        "forward_ms_each": [round(ms, 2) for ms in forward_ms],
        "kinds": kinds,
        "matmul_gflops_per_s": round(peak_gflops, 2),
        "matmul_gflops_per_s_before_after": [round(1000 * rate, 2) for rate in rates],
        "matmul_size": matmul_size,
        "threads": torch.get_num_threads(),
        "warmup": warmup,
        "iterations": iterations,
        "device": "cpu",
        "torch": torch.__version__,
        "profile_measure": (
            "fvcore multiply-adds per kind; CPU time per kind from torch.profiler (outermost "
            "aten ops of the kind, inclusive), mean over the profiled forwards, other = the "
            "forward's wall clock minus the kinds; achieved GFLOP/s at 2 FLOPs per multiply-add "
            "against float32 matmul_rate (the higher of before and after)"
        ),
    }
