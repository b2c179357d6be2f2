"""Everything that needs a GPU, in one command that ends within 8 minutes on the GPU machine.

    make gpu-wheels                  # here, with PyPI: .whl/ holds what the GPU image lacks
    make gpu-check GPU_OUT=$OUT      # there: installs .whl/ offline, then runs this script
    make gpu-check DEVICE=cpu        # the dry run: every step at tiny sizes on the CPU
    make gpu-standin gpu-standin-check   # the dry run in a stand-in of the GPU machine's Python
    python tools/gpu_check.py --device cuda --output DIR [--steps table,demo] [--budget-s 420]

The GPU machine has its own Python 3.12 and PyTorch (2.11) and no package registry: only its
image's packages (`GPU_IMAGE_PACKAGES`) and the wheels `--build-wheels DIR` downloads or
builds here (`GPU_WHEELS`); tools/gpu_environment.py checks that what the package and this
command import is among them.

The steps (environment, matmul, tests, fast_path, headline, training, batched, table, demo,
autotune, onnx) are `eomt/gpu_check.py`'s, which says what each measures; a step that would
start after `--budget-s` seconds is recorded as skipped, and `--steps` runs a subset (e.g.
what a first call left out). The full record goes to OUTPUT/gpu_check.json, rewritten after
every step (a killed run keeps what it measured); the table comes last, with each step's
outcome. The exit status is 1 when a step failed, and the table says which.
"""

import argparse
import subprocess
import sys
from pathlib import Path

import torch

from eomt.gpu_check import STEPS, exit_status, run_checks

# The GPU machine's image: its Python and packages (distribution names), read off the device's
# KINDS.md on 2026-11-17, with the versions it gave.
GPU_IMAGE_PYTHON = "3.12.3"
GPU_IMAGE_PACKAGES = frozenset(
    """
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
    botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
    coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython
    diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic
    frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
    hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
    jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
    linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl
    meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
    narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti
    nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile
    nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
    nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime
    onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
    orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
    prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
    pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
    pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich
    sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn
    sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
    statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
    tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
    torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions
    typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
    """.split()
)
GPU_IMAGE_VERSIONS = {
    "numpy": "2.5.2",
    "onnx": "1.23.1",
    "onnxruntime": "1.30.0",
    "safetensors": "0.8.0",
    "torch": "2.11.0",
    "torchvision": "0.26.0",
    "triton": "3.6.0",
    "transformers": "5.17.0",
    "huggingface-hub": "1.33.0",
    "pytorch-lightning": "2.6.6",
    "torchmetrics": "1.9.0",
}
# Packages the GPU image lacks, carried as wheels; timm is carried to match the pinned one.
GPU_WHEELS = [
    "omegaconf==2.4.0",
    "pycocotools==2.0.11",
    "timm==1.0.31",
    "fvcore==0.1.5.post20221221",
    "iopath==0.1.10",
    "yacs==0.1.8",
    "termcolor==3.3.0",
]
# Modules in neither, imported (inside functions) only by features this command never uses.
MODULES_NOT_NEEDED_ON_GPU = {
    "cityscapesscripts": "the Cityscapes label table: Cityscapes data and class names only",
    "pyspng": "faster panoptic PNG decoding; Pillow decodes the same pixels without it",
    "wandb": "logging to wandb (wandb.enabled=true) only",
    "av": "video files (eomt/deploy/video.py: tools/predict.py --video) only",
}
# Package files this command never imports (directly or not), with modules in neither.
FILES_NOT_NEEDED_ON_GPU = {
    "eomt/deploy/server.py": "the HTTP service (tools/serve.py): FastAPI and Starlette",
}
WHEEL_PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]


def build_wheels(folder: Path) -> None:
    """Download (or build, for pure-Python source releases) GPU_WHEELS for the GPU image's
    CPython on x86-64 Linux into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    platforms = [arg for p in WHEEL_PLATFORMS for arg in ("--platform", p)]
    python_version = ".".join(GPU_IMAGE_PYTHON.split(".")[:2])
    for requirement in GPU_WHEELS:
        download = [*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(folder)]
        download += ["--python-version", python_version, "--implementation", "cp", *platforms]
        if subprocess.run([*download, requirement], capture_output=True).returncode != 0:
            subprocess.run(
                [*pip, "wheel", "-q", "--no-deps", "-w", str(folder), requirement], check=True
            )
    print(f"{len(list(folder.glob('*.whl')))} wheels in {folder}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--output", default="output/gpu_check", help="folder of gpu_check.json")
    parser.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset")
    parser.add_argument(
        "--budget-s", type=float, help="start nothing after this (default: 420 cuda, 300 cpu)"
    )
    parser.add_argument("--build-wheels", metavar="DIR", help="only build the wheels, here")
    args = parser.parse_args(argv)
    unknown = set(args.steps.split(",")) - set(STEPS)
    if unknown:
        parser.error(f"--steps: unknown {sorted(unknown)}; the steps are {', '.join(STEPS)}")
    if args.budget_s is None:
        args.budget_s = 420.0 if args.device == "cuda" else 300.0
    return args


def main(args) -> dict:
    """Runs the steps (or builds the wheels); returns the record."""
    if args.build_wheels:
        build_wheels(Path(args.build_wheels))
        return {}
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; the dry run is --device cpu")
    return run_checks(args.device, Path(args.output), args.budget_s, args.steps.split(","))


if __name__ == "__main__":
    sys.exit(exit_status(main(parse_args())))
