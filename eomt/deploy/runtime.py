"""How the inference forward runs: precision (weights and autocast), attention kernel and
compilation.

The eager forward with float32 weights is the reference; each option computes the same
function within its precision (tests/test_runtime.py; `tools/gpu_check.py` checks it on a GPU
at the paper's shapes, beside its timings). `tools/benchmark.py` and `tools/predict.py` take
the options as flags. The precision a forward reports is the one it ran: FastForward sets
autocast itself, so an autocast around it changes nothing.
"""

from contextlib import nullcontext

import torch
from torch import nn

COMPILE_MODES = ("none", "default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead")
SDPA_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")
WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
AUTOCAST_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# FastForward's options, in the order it takes them.
RUNTIME_OPTIONS = ("compile_mode", "sdpa_backend", "weights_dtype", "autocast")


def replays_cuda_graphs(compile_mode: str) -> bool:
    """Whether inductor's options of `compile_mode` replay CUDA graphs (reduce-overhead and
    max-autotune do): a replay overwrites the outputs of the one before."""
    if compile_mode == "none":
        return False
    from torch._inductor import list_mode_options

    return bool(list_mode_options(compile_mode).get("triton.cudagraphs", False))


def precision_name(weights_dtype: str, autocast: str) -> str:
    """What a forward computes in: "fp32", "bf16 weights", "fp32 weights + bf16 autocast"."""
    if autocast != "none":
        return f"{weights_dtype} weights + {autocast} autocast"
    return "fp32" if weights_dtype == "fp32" else f"{weights_dtype} weights"


def check_precision(weights_dtype: str, autocast: str | None) -> None:
    """Autocast only over float32 weights: over cast ones it would recast them."""
    if autocast not in (None, "none") and weights_dtype != "fp32":
        raise ValueError(
            f"autocast {autocast} with {weights_dtype} weights would recast them at every "
            "forward: use fp32 weights with autocast, or cast weights without it"
        )


def default_autocast(device, weights_dtype: str, amp: str) -> str:
    """The autocast a tool runs when none is asked for: `amp` for float32 weights on CUDA
    (the paper timed with bf16 AMP), none on a CPU or with cast weights."""
    return amp if torch.device(device).type == "cuda" and weights_dtype == "fp32" else "none"


def sdpa_context(backend: str):
    """Restricts `scaled_dot_product_attention` to one kernel; "auto" lets PyTorch choose."""
    if backend == "auto":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernels = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }
    return sdpa_kernel(kernels[backend])


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")


class FastForward(nn.Module):
    """`model` (in eval mode) run with the chosen options; called like the model.

    Args:
        compile_mode: "none" (eager) or a `torch.compile` mode; shapes are compiled static, so
            each new input shape compiles once more (PyTorch keeps up to 8 per call site).
        sdpa_backend: the attention kernel (`SDPA_BACKENDS`); one a device lacks fails at the
            first forward with PyTorch's reason.
        weights_dtype: "fp32", or "bf16" / "fp16" to cast the weights once; inputs follow the
            weights' dtype.
        autocast: "none", or "bf16" / "fp16" autocast around the forward, which casts float32
            weights at every forward (the paper's AMP); refused with cast weights, which it
            would recast. "none" turns off any autocast around the call.
    """

    def __init__(
        self,
        model: nn.Module,
        compile_mode: str = "none",
        sdpa_backend: str = "auto",
        weights_dtype: str = "fp32",
        autocast: str = "none",
    ):
        super().__init__()
        _check_choice("compile_mode", compile_mode, COMPILE_MODES)
        _check_choice("sdpa_backend", sdpa_backend, SDPA_BACKENDS)
        _check_choice("weights_dtype", weights_dtype, WEIGHT_DTYPES)
        _check_choice("autocast", autocast, AUTOCAST_DTYPES)
        check_precision(weights_dtype, autocast)
        if compile_mode != "none" and getattr(model, "token_merging", None) is not None:
            raise ValueError(
                "token merging gives each image its own number of tokens: torch.compile "
                "(static shapes) would recompile for each; run it eager (compile_mode none)"
            )
        self.compile_mode, self.sdpa_backend = compile_mode, sdpa_backend
        self.weights_dtype, self.autocast = weights_dtype, autocast
        self.replays_cuda_graphs = replays_cuda_graphs(compile_mode)
        self.model = model.eval().to(WEIGHT_DTYPES[weights_dtype])
        if compile_mode != "none":
            # In place: the module keeps its parameters and attributes; only its call compiles.
            self.model.compile(
                mode=None if compile_mode == "default" else compile_mode, dynamic=False
            )

    def forward(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        replays_graphs = self.replays_cuda_graphs and images.is_cuda
        if replays_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        autocast = torch.autocast(
            images.device.type,
            dtype=AUTOCAST_DTYPES[self.autocast],
            enabled=self.autocast != "none",
        )
        with autocast, sdpa_context(self.sdpa_backend):
            predictions = self.model(images.to(WEIGHT_DTYPES[self.weights_dtype]))
        if replays_graphs:
            # A replay overwrites the previous replay's outputs: hand out copies.
            predictions = [{k: v.clone() for k, v in p.items()} for p in predictions]
        return predictions

    def describe(self) -> dict:
        return {
            "compile_mode": self.compile_mode,
            "sdpa_backend": self.sdpa_backend,
            "weights_dtype": self.weights_dtype,
            "autocast": self.autocast,
            "precision": precision_name(self.weights_dtype, self.autocast),
        }


def add_runtime_arguments(parser, autocast_default: str) -> None:
    """--compile, --sdpa-backend, --weights-dtype and --autocast, as tools/benchmark.py and
    tools/predict.py take them (FastForward's options); `autocast_default` says what the tool
    runs without --autocast."""
    parser.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default="none",
        choices=COMPILE_MODES,
        help="torch.compile mode (no value: default); compiles once per input shape",
    )
    parser.add_argument(
        "--sdpa-backend", default="auto", choices=SDPA_BACKENDS, help="attention kernel"
    )
    parser.add_argument(
        "--weights-dtype",
        default="fp32",
        choices=sorted(WEIGHT_DTYPES),
        help="cast the weights once to bf16 or fp16 (default fp32)",
    )
    parser.add_argument(
        "--autocast",
        choices=sorted(AUTOCAST_DTYPES),
        help=f"autocast around the forward, with fp32 weights only (default: {autocast_default})",
    )


def check_runtime_arguments(parser, args) -> None:
    """The parser's error for options FastForward would refuse (autocast over cast weights)."""
    try:
        check_precision(args.weights_dtype, args.autocast)
    except ValueError as error:
        parser.error(f"--autocast: {error}")
