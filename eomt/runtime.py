"""How the inference forward runs: weight precision, attention kernel and compilation.

The eager forward with float32 weights is the reference; each option computes the same
function within its precision (tests/test_runtime.py; `tools/gpu_check.py` checks it on a GPU
at the paper's shapes, beside its timings). `tools/benchmark.py` and `tools/predict.py` take
the options as flags.
"""

from contextlib import nullcontext

import torch
from torch import nn

# "reduce-overhead" replays CUDA graphs (on a GPU), removing the per-kernel launch cost.
COMPILE_MODES = ("none", "default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead")
SDPA_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")
WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
        weights_dtype: "fp32", or "bf16" / "fp16" to cast the weights once (autocast instead casts
            every weight at every forward); inputs follow the weights' dtype.
    """

    def __init__(
        self,
        model: nn.Module,
        compile_mode: str = "none",
        sdpa_backend: str = "auto",
        weights_dtype: str = "fp32",
    ):
        super().__init__()
        _check_choice("compile_mode", compile_mode, COMPILE_MODES)
        _check_choice("sdpa_backend", sdpa_backend, SDPA_BACKENDS)
        _check_choice("weights_dtype", weights_dtype, WEIGHT_DTYPES)
        self.compile_mode, self.sdpa_backend = compile_mode, sdpa_backend
        self.weights_dtype = weights_dtype
        self.model = model.eval().to(WEIGHT_DTYPES[weights_dtype])
        if compile_mode != "none":
            # In place: the module keeps its parameters and attributes; only its call compiles.
            self.model.compile(
                mode=None if compile_mode == "default" else compile_mode, dynamic=False
            )

    def forward(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        replays_graphs = self.compile_mode == "reduce-overhead" and images.is_cuda
        if replays_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with sdpa_context(self.sdpa_backend):
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
        }


def add_runtime_arguments(parser) -> None:
    """--compile, --sdpa-backend and --weights-dtype, as tools/benchmark.py and
    tools/predict.py take them (FastForward's options)."""
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
        help="cast the weights once to bf16 or fp16 (default fp32, autocast at every forward)",
    )
