"""The checks that need a GPU, step by step, and their record: what `tools/gpu_check.py` runs
(on the GPU machine, or as its CPU dry run at tiny sizes). The measurements themselves are
`eomt.benchmark`'s; each step's result is kept in a JSON record, with why a step failed.

Steps, in this order (a step or model that would start after the time budget is recorded as
skipped):

  environment  versions, GPU, attention kernels available
  matmul       the bf16 matrix-multiply rate (8192^3): the ceiling throughput is compared with
  tests        pytest -m gpu: bf16 inference, a masked training step, the Triton deformable
               attention against the PyTorch path (forward and gradients, bf16 and fp32)
  fast_path    EoMT-L 640 at batch 1 with each runtime option (eomt/deploy/runtime.py: compile mode,
               attention kernel, precision): FPS, and the relative error of its outputs
               against the eager float32 forward
  headline     ViT-Adapter + M2F-L 640 with the fastest agreeing option: the 4.4x of the paper
  training     EoMT-L 640 training steps, 4 images, masked attention in every query block
  batched      EoMT-L 640 at batch 8 and 32: images/s and the share of the matmul ceiling
  table        the rest of the paper's FPS table (S/B/g, L at 1280, L with masking, M2F S/B/g)
  videomt      VidEoMT-L 640 per video frame (its streaming step, queries carried) beside the
               authors' 160 FPS for YouTube-VIS 2019, and EoMT-L 640 without masking with the
               same option: what the propagation costs per frame
  token_merging  EoMT-L Cityscapes 1024 windows at batch 32 with and without ALGM token merging
               (synthetic street scenes, eager, bf16 autocast), beside the paper's 29 -> 38 img/s
  demo         the synthetic demo config trained on the device: the loss falls, PQ is scored
  autotune     EoMT-L 640 with torch.compile mode max-autotune (slow to compile)
  onnx         EoMT-S 640 exported in fp32 and fp16, checked with onnxruntime

Weights are random (nothing is downloaded); the paper's FPS come from
configs/paper_results.yaml. A step fails on an error in its record, an option whose outputs
disagree with the eager float32 forward, failing GPU tests or a demo loss that did not fall.
"""

import copy
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from eomt.benchmark import (
    VideoStep,
    achieved_tflops,
    count_flops,
    count_parameters,
    matmul_rate,
    measure_fps,
    measure_training,
)
from eomt.config import get_cfg
from eomt.deploy.runtime import RUNTIME_OPTIONS
from eomt.modeling import build_model
from eomt.report import paper_row

REPO = Path(__file__).resolve().parents[1]
P = "configs/coco/panoptic"
# name: (config, its row of configs/paper_results.yaml, whose FPS the paper measured on an
# H100: batch 1, FlashAttention-2, torch.compile, bf16 AMP)
MODELS = {
    "EoMT-L 640": (f"{P}/eomt_large_640.yaml", "table2.eomt_large"),
    "M2F-L 640": (f"{P}/m2f_vit_adapter_large_640.yaml", "table2.m2f_large"),
    "EoMT-S 640": (f"{P}/eomt_small_640.yaml", "table2.eomt_small"),
    "EoMT-B 640": (f"{P}/eomt_base_640.yaml", "table2.eomt_base"),
    "EoMT-g 640": (f"{P}/eomt_giant_640.yaml", "table2.eomt_giant"),
    "EoMT-L 1280": (f"{P}/eomt_large_1280.yaml", "coco_panoptic.eomt_large_1280"),
    "EoMT-L 640 w/ masking": (f"{P}/eomt_large_640_masking.yaml", "table2.eomt_masking_large"),
    "M2F-S 640": (f"{P}/m2f_vit_adapter_small_640.yaml", "table2.m2f_small"),
    "M2F-B 640": (f"{P}/m2f_vit_adapter_base_640.yaml", "table2.m2f_base"),
    "M2F-g 640": (f"{P}/m2f_vit_adapter_giant_640.yaml", "table2.m2f_giant"),
}
# VidEoMT-L 640 as the authors' YouTube-VIS 2019 model (DINOv2-L, 200 queries, the last 4
# blocks see them, 40 classes, no masked attention) and the FPS of their model zoo
# (tue-mps/videomt, model_zoo/dinov2.md: H100, default torch.compile); the image EoMT of the
# same backbone without masking beside it.
VIDEOMT = "VidEoMT-L 640"
VIDEOMT_ZOO = "videomt.ytvis19_large"  # its row of configs/paper_results.yaml
VIDEOMT_OVERRIDES = ["model.name=videomt", "model.masked_attn=never", "model.num_classes=40"]
VIDEOMT_IMAGE_OVERRIDES = ["model.masked_attn=never", "model.num_classes=40"]
# The paper's token merging table (tab:algm): EoMT-L on Cityscapes (1024 windows) with and
# without ALGM, images/s at batch 32; ALGM's ViT-L settings (global merging after block 6,
# threshold 0.95). Merging cannot be compiled: both models run eagerly, bf16 autocast.
TOKEN_MERGING_CONFIG = "configs/cityscapes/semantic/eomt_large_1024.yaml"
TOKEN_MERGING_OVERRIDES = [
    "model.token_merging.global_block=6",
    "model.token_merging.threshold=0.95",
]
# The dry run's stand-in for every model: the same configs, a 4-block ViT of width 32 and a
# tenth of the input size.
TINY_OVERRIDES = [
    "model.backbone_kwargs={embed_dim: 32, depth: 4, num_heads: 2}",
    "model.num_queries=8",
    "model.num_query_blocks=2",
    "m2f.hidden_dim=32",
    "m2f.num_heads=4",
    "m2f.dim_feedforward=64",
    "m2f.enc_layers=1",
    "m2f.enc_dim_feedforward=64",
    "m2f.dec_layers=3",
    "loss.num_points=256",
]
# (compile mode, SDPA kernel, weights dtype, autocast) as FastForward takes them
# (eomt/deploy/runtime.py), cheapest first; CUDA and the CPU dry run. fp32 weights under bf16
# autocast, compiled, is the paper's setting; the flash and cuDNN kernels need half-precision
# inputs.
FAST_PATH_VARIANTS = {
    "cuda": [
        ("none", "auto", "fp32", "none"),
        ("none", "auto", "fp32", "bf16"),
        ("none", "flash", "fp32", "bf16"),
        ("none", "cudnn", "fp32", "bf16"),
        ("none", "efficient", "fp32", "bf16"),
        ("none", "auto", "bf16", "none"),
        ("none", "auto", "fp16", "none"),
        ("default", "auto", "fp32", "bf16"),
        ("default", "auto", "bf16", "none"),
        ("default", "cudnn", "bf16", "none"),
        ("reduce-overhead", "auto", "bf16", "none"),
    ],
    "cpu": [
        ("none", "auto", "fp32", "none"),
        ("none", "math", "fp32", "none"),
        ("none", "auto", "bf16", "none"),
        ("none", "auto", "fp16", "none"),
        ("none", "auto", "fp32", "bf16"),
        ("default", "auto", "fp32", "none"),
    ],
}
AUTOTUNE_VARIANT = ("max-autotune", "auto", "bf16", "none")
# Largest relative L2 error of a variant's logits against the eager float32 forward: half
# precision over up to 40 blocks; float32 variants land near 1e-6.
AGREEMENT_TOLERANCE = 5e-2
GPU_TEST_FILES = ["tests/test_gpu.py", "tests/test_ms_deform_attn.py", "tests/test_benchmark.py"]
PREPARE_SYNTHETIC = "datasets/prepare_synthetic.py"
TRAIN_NET = "tools/train_net.py"
DEMO_CONFIG = "configs/synthetic/eomt_tiny_panoptic.yaml"
# The scripts the command runs in their own processes (tools/gpu_environment.py checks their
# imports with this file's).
GPU_COMMAND_SCRIPTS = [PREPARE_SYNTHETIC, TRAIN_NET]

STEPS = (
    "environment",
    "matmul",
    "tests",
    "fast_path",
    "headline",
    "training",
    "batched",
    "table",
    "videomt",
    "token_merging",
    "demo",
    "autotune",
    "onnx",
)


class Run:
    """The record of one gpu_check run, its time budget and its sizes for the device."""

    def __init__(self, device: str, output: Path, budget_s: float):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.output = output
        self.budget_s = budget_s
        self.start = time.perf_counter()
        self.record: dict = {"device": device, "budget_s": budget_s, "steps": {}}
        # Timing sizes: many forwards on a GPU, a few on the CPU; the first compiles.
        self.warmup, self.iterations = (20, 200) if self.cuda else (1, 3)
        # Where the chosen option fails for a model (say bf16 weights in a custom kernel).
        self.fallback_variant = (
            ("default", "auto", "fp32", "bf16") if self.cuda else ("none", "auto", "fp32", "none")
        )

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def out_of_time(self) -> bool:
        return self.elapsed() > self.budget_s

    def save(self) -> None:
        self.record["elapsed_s"] = round(self.elapsed(), 1)
        self.output.mkdir(parents=True, exist_ok=True)
        (self.output / "gpu_check.json").write_text(json.dumps(self.record, indent=1) + "\n")

    def cfg(self, name: str, extra: list[str] = ()):
        config, _ = MODELS[name]
        return self.cfg_of(config, extra)

    def cfg_of(self, config: str, extra: list[str] = ()):
        overrides = ["model.pretrained=false", *extra]
        if not self.cuda:
            size = get_cfg(REPO / config).input.image_size[0] // 10
            overrides = [*overrides, *TINY_OVERRIDES, f"input.image_size=[{size}, {size}]"]
        return get_cfg(REPO / config, overrides)

    def build(self, cfg):
        torch.manual_seed(0)
        with torch.device(self.device):  # random init on the device: seconds, not minutes
            return build_model(cfg, backbone_weights=False).eval()


def paper_fps(name: str) -> float:
    return paper_row(MODELS[name][1])["fps"]


def release_compiled() -> None:
    """Forget compiled graphs: models of one class share their forward's code object, whose
    compile cache holds 8 entries before it falls back to eager without a word."""
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure(run: Run, model, image_size, variant: tuple, batch_size: int = 1) -> dict:
    """`measure_fps` of a copy of `model` with one runtime option, as the record keeps it; or
    the variant and the error that stopped it (a kernel a device lacks, a compile failure):
    one option failing does not end the check."""
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(batch_size, 3, *image_size, generator=generator).to(run.device)
    try:
        timing = measure_fps(
            copy.deepcopy(model),
            images,
            run.warmup,
            run.iterations,
            **dict(zip(RUNTIME_OPTIONS, variant)),
        )
    except Exception as error:  # recorded, not raised: the other variants still run
        return {"variant": list(variant), "error": f"{type(error).__name__}: {error}"[:500]}
    finally:
        release_compiled()
    return {
        **{key: timing[key] for key in (*RUNTIME_OPTIONS, "precision")},
        "batch_size": batch_size,
        "fps": round(batch_size * timing["forwards_per_second"], 2),
        "median_ms": round(timing["median_ms"], 3),
        "min_ms": round(timing["min_ms"], 3),
        "max_ms": round(timing["max_ms"], 3),
        "iterations": timing["iterations"],
        "warmup": timing["warmup"],
        "first_forward_s": round(timing["first_forward_s"], 1),
        "relative_error": timing["relative_error"],
        "agrees": timing["relative_error"] < AGREEMENT_TOLERANCE,
        "peak_memory_mb": round(timing["peak_memory_mb"], 1),
    }


def variant_of(measured: dict) -> tuple:
    return tuple(measured[key] for key in RUNTIME_OPTIONS)


def best_variant(run: Run) -> tuple:
    """The fastest agreeing variant of the fast_path step (else the fallback)."""
    measured = run.record["steps"].get("fast_path", {}).get("variants", [])
    agreeing = [m for m in measured if m.get("agrees")]
    if not run.cuda:  # the dry run compiles once, in fast_path: compiling on a CPU takes minutes
        agreeing = [m for m in agreeing if m["compile_mode"] == "none"]
    if not agreeing:
        return run.fallback_variant
    return variant_of(max(agreeing, key=lambda m: m["fps"]))


def fps_entry(run: Run, name: str, variants: list[tuple]) -> dict:
    """One row of the FPS table: the first of `variants` that runs and agrees."""
    cfg = run.cfg(name)
    model = run.build(cfg)
    entry = {"config": MODELS[name][0], "paper_fps": paper_fps(name)}
    entry["params"] = count_parameters(model)
    for variant in variants:
        result = measure(run, model, cfg.input.image_size, variant)
        entry.setdefault("tried", []).append(result)
        if result.get("agrees"):
            entry.update(result)
            entry["ratio_to_paper"] = round(result["fps"] / entry["paper_fps"], 2)
            break
    del model
    release_compiled()
    return entry


# -- steps --------------------------------------------------------------------------------------


def step_environment(run: Run) -> dict:
    import timm

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if run.cuda:
        properties = torch.cuda.get_device_properties(run.device)
        info.update(
            gpu=properties.name,
            capability=list(torch.cuda.get_device_capability(run.device)),
            memory_gib=round(properties.total_memory / 2**30, 1),
            multiprocessors=properties.multi_processor_count,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            sdpa_enabled={
                "flash": torch.backends.cuda.flash_sdp_enabled(),
                "efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                "math": torch.backends.cuda.math_sdp_enabled(),
            },
        )
    return info


def step_matmul(run: Run) -> dict:
    return matmul_rate(run.device, 8192 if run.cuda else 512)


def step_tests(run: Run) -> dict:
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
    timeout = max(run.budget_s - run.elapsed(), 30)
    try:
        done = subprocess.run(
            [*command, *GPU_TEST_FILES],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"pytest -m gpu did not end within {timeout:.0f} s"}
    lines = done.stdout.strip().splitlines()
    return {
        "command": " ".join(command[2:] + GPU_TEST_FILES),
        "returncode": done.returncode,
        "summary": lines[-1] if lines else done.stderr[-300:],
        "failures": [line for line in lines if line.startswith(("FAILED", "ERROR"))],
    }


def step_fast_path(run: Run, variants=None) -> dict:
    name = "EoMT-L 640"
    cfg = run.cfg(name)
    model = run.build(cfg)
    results = []
    for variant in variants or FAST_PATH_VARIANTS[run.device.type]:
        if run.out_of_time():
            results.append({"variant": list(variant), "skipped": "time budget"})
            continue
        results.append(measure(run, model, cfg.input.image_size, variant))
        print(f"  {name} {variant}: {json.dumps(results[-1])}", flush=True)
    return {"model": name, "config": MODELS[name][0], "variants": results}


def step_headline(run: Run) -> dict:
    entry = fps_entry(run, "M2F-L 640", [best_variant(run), run.fallback_variant])
    result = {"M2F-L 640": entry}
    eomt = run.record["steps"].get("fast_path", {}).get("variants", [])
    eomt_best = max((m for m in eomt if m.get("agrees")), key=lambda m: m["fps"], default=None)
    if eomt_best is not None and "fps" in entry:
        result["eomt_over_m2f"] = round(eomt_best["fps"] / entry["fps"], 2)
    return result


def step_training(run: Run) -> dict:
    cfg = run.cfg("EoMT-L 640")
    batch, steps = (4, 10) if run.cuda else (2, 2)
    result = measure_training(
        cfg, run.device, batch_size=batch, warmup=3 if run.cuda else 1, steps=steps
    )
    result["config"] = MODELS["EoMT-L 640"][0]
    return result


def step_batched(run: Run) -> dict:
    cfg = run.cfg("EoMT-L 640")
    model = run.build(cfg)
    height, width = cfg.input.image_size
    with torch.no_grad():
        flops = count_flops(model, torch.rand(1, 3, height, width, device=run.device))["flops"]
    ceiling = run.record["steps"].get("matmul", {}).get("tflops")
    result = {"flops_per_image": flops, "matmul_tflops": ceiling, "batches": []}
    for batch_size in (8, 32) if run.cuda else (2,):
        if run.out_of_time():
            result["batches"].append({"batch_size": batch_size, "skipped": "time budget"})
            continue
        measured = measure(run, model, (height, width), best_variant(run), batch_size)
        if "fps" in measured:
            achieved = achieved_tflops(measured["fps"], flops)
            measured["images_per_second"] = measured.pop("fps")
            measured["achieved_tflops"] = float(f"{achieved:.3g}")
            if ceiling:
                # Significant figures: a CPU dry run's share is far below 0.001.
                measured["share_of_matmul_ceiling"] = float(f"{achieved / ceiling:.3g}")
        result["batches"].append(measured)
    return result


def step_table(run: Run) -> dict:
    done = set(run.record["steps"].get("headline", {}))
    rows = {}
    for name in MODELS:
        if name in done or name == "EoMT-L 640":
            continue
        if run.out_of_time():
            rows[name] = {"skipped": "time budget"}
            continue
        try:
            rows[name] = fps_entry(run, name, [best_variant(run), run.fallback_variant])
        except Exception as error:  # recorded: the other models still run
            rows[name] = {"error": f"{type(error).__name__}: {error}"[:500]}
        print(f"  {name}: {rows[name].get('fps', rows[name].get('tried'))}", flush=True)
    return rows


def step_videomt(run: Run) -> dict:
    """VidEoMT-L 640 per frame (`VideoStep`), with the fastest agreeing option of fast_path
    (else the fallback), and EoMT-L 640 without masking with the option VidEoMT ran."""
    config = MODELS["EoMT-L 640"][0]
    cfg = run.cfg_of(config, VIDEOMT_OVERRIDES)
    size = cfg.input.image_size
    video = VideoStep(run.build(cfg))
    entry = {
        "config": config,
        "overrides": VIDEOMT_OVERRIDES,
        "paper_fps": paper_row(VIDEOMT_ZOO)["fps"],
        "paper": "tue-mps/videomt model zoo: YouTube-VIS 2019 VidEoMT-L, H100, torch.compile",
        "per": "video frame: the streaming step, queries carried in and out",
        "params": count_parameters(video),
    }
    for variant in dict.fromkeys([best_variant(run), run.fallback_variant]):
        result = measure(run, video, size, variant)
        entry.setdefault("tried", []).append(result)
        if result.get("agrees"):
            entry.update(result)
            entry["ratio_to_paper"] = round(result["fps"] / entry["paper_fps"], 2)
            break
    del video
    release_compiled()
    rows = {VIDEOMT: entry}
    if "fps" in entry and not run.out_of_time():
        image_cfg = run.cfg_of(config, VIDEOMT_IMAGE_OVERRIDES)
        image = measure(run, run.build(image_cfg), size, variant_of(entry))
        rows["EoMT-L 640 w/o masking"] = {**image, "overrides": VIDEOMT_IMAGE_OVERRIDES}
        if "fps" in image:
            rows["videomt_frame_over_eomt_image_ms"] = round(
                entry["median_ms"] / image["median_ms"], 3
            )
    return rows


def step_token_merging(run: Run) -> dict:
    """Images/s of EoMT-L on Cityscapes-sized street scenes (`street_scene`, two 1024 windows
    each) with and without merging, batch 32 windows, timed in turns; tokens kept per merge."""
    from eomt.inference import autocast_for
    from eomt.merging_benchmark import (
        image_windows,
        interleaved_times,
        merged_counts,
        street_scene,
    )

    cfg = run.cfg_of(TOKEN_MERGING_CONFIG, TOKEN_MERGING_OVERRIDES)
    if not run.cuda:  # the dry run's ViT has 2 blocks before its query blocks
        cfg.model.token_merging.global_block = 1
    models = {}
    for enabled in (False, True):
        cfg.model.token_merging.enabled = enabled
        models["merged" if enabled else "plain"] = run.build(cfg)
    models["merged"].load_state_dict(models["plain"].state_dict())
    window = cfg.input.image_size[0]
    batch_size, rounds = (32, 5) if run.cuda else (2, 1)
    scenes = [street_scene(window, 2 * window, seed=i) for i in range(batch_size // 2)]
    windows = torch.cat([image_windows(scene, cfg) for scene in scenes]).to(run.device)
    per_image = len(windows) // len(scenes)
    with torch.no_grad(), autocast_for(run.device, "bf16"):
        models["merged"](windows)  # the tokens it keeps
        tokens = merged_counts(models["merged"])
        times = interleaved_times(models, [windows], rounds)
    paper = {name: paper_row(f"token_merging.{name}") for name in ("eomt", "eomt_algm")}
    result = {
        "config": TOKEN_MERGING_CONFIG,
        "overrides": TOKEN_MERGING_OVERRIDES,
        "batch_windows": len(windows),
        "windows_per_image": per_image,
        "precision": "bf16 autocast" if run.cuda else "float32",
        "tokens_after_merges": [round(sum(c) / len(c), 1) for c in tokens],
        "paper_images_per_second": {
            "plain": paper["eomt"]["fps"],
            "merged": paper["eomt_algm"]["fps"],
        },
    }
    for name, milliseconds in times.items():
        result[f"images_per_second_{name}"] = round(1000 * len(scenes) / min(milliseconds), 2)
    result["speedup"] = round(min(times["plain"]) / min(times["merged"]), 3)
    return result


def step_demo(run: Run) -> dict:
    """The demo config trained on the device; the loss must fall and PQ be scored."""
    work = Path(tempfile.mkdtemp(prefix="gpu_check_demo_"))
    data = work / "synthetic"
    counts = [] if run.cuda else ["--num-train", "16", "--num-val", "4"]
    iterations = 600 if run.cuda else 4
    timeout = max(run.budget_s - run.elapsed(), 60)
    start = time.perf_counter()
    try:
        subprocess.run(
            [sys.executable, PREPARE_SYNTHETIC, "--output", str(data), *counts],
            cwd=REPO,
            check=True,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        overrides = [f"dataset.root={data}", f"output_dir={work / 'run'}"]
        overrides += [f"solver.max_iter={iterations}", f"checkpoint_period={iterations}"]
        overrides += ["log_period=2", "test.num_vis=0", "solver.warmup_iters=[2, 2]"]
        if run.cuda:
            overrides += ["dataloader.num_workers=4", "solver.amp=bf16"]
        trained = subprocess.run(
            [sys.executable, TRAIN_NET, "--config-file", DEMO_CONFIG, *overrides],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"did not end within {timeout:.0f} s"}
    except subprocess.CalledProcessError as error:
        return {"error": f"preparing the data failed: {error.stderr[-500:]}"}
    result = {"iterations": iterations, "seconds": round(time.perf_counter() - start, 1)}
    if trained.returncode != 0:
        result["error"] = trained.stderr[-1000:]
        return result
    records = [json.loads(line) for line in (work / "run/metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    results = json.loads((work / "run/results.json").read_text())
    result.update(
        first_loss=losses[0],
        last_loss=losses[-1],
        loss_fell=losses[-1] < losses[0],
        time_per_iter=[r["time_per_iter"] for r in records if "time_per_iter" in r][-1],
        pq=results["panoptic"]["PQ"],
        miou=results.get("semantic", {}).get("mIoU"),
        ap=results.get("instance", {}).get("AP"),
    )
    return result


def step_autotune(run: Run) -> dict:
    if not run.cuda:
        return {"skipped": "CPU dry run: max-autotune tunes GPU kernels"}
    return step_fast_path(run, [AUTOTUNE_VARIANT])


def step_onnx(run: Run) -> dict:
    from eomt.deploy.onnx_export import (
        DEFAULT_MIN_AGREEMENT,
        DEFAULT_RELATIVE_TOLERANCE,
        check,
        check_failures,
        check_inputs,
        export,
        onnx_provider,
    )

    cfg = run.cfg("EoMT-S 640")
    model = run.build(cfg).cpu()
    size = tuple(cfg.input.image_size)
    result = {"provider": onnx_provider()}
    with tempfile.TemporaryDirectory() as folder:
        for precision in ("fp32", "fp16"):
            path = export(model, Path(folder) / f"eomt_{precision}.onnx", size, precision=precision)
            comparisons = check(model, path, check_inputs(size), result["provider"])
            tolerance = DEFAULT_RELATIVE_TOLERANCE[precision]
            failures = check_failures(comparisons, tolerance, DEFAULT_MIN_AGREEMENT)
            result[precision] = {
                "max_abs_difference": max(c.difference for c in comparisons.values()),
                "relative_error": max(c.relative for c in comparisons.values()),
                "label_agreement": comparisons["synthetic scene"].agreement,
                "agrees": not failures,
                "precision": f"onnx {precision}",
                "megabytes": round(path.stat().st_size / 2**20, 1),
            }
    return result


STEP_FUNCTIONS = {name: globals()[f"step_{name}"] for name in STEPS}


def step_failures(result) -> list[str]:
    """Why a step's record (or a part of it) failed: an error anywhere in it, an option whose
    outputs disagree with the eager float32 forward, an FPS row no option ran for, failing
    GPU tests, a demo whose loss did not fall; [] when it did not."""
    if isinstance(result, list):
        return [why for item in result for why in step_failures(item)]
    if not isinstance(result, dict):
        return []
    found = []
    if "error" in result:
        found.append(f"error: {str(result['error']).strip()[:200]}")
    if result.get("agrees") is False:
        found.append(f"{result['precision']}: relative error {result['relative_error']:.2g}")
    if "tried" in result and "fps" not in result:  # the tries' own errors stay there
        found.append("no option ran and agreed")
    if result.get("returncode", 0) != 0:
        found.append(f"pytest exit status {result['returncode']}: {result.get('summary')}")
    if result.get("loss_fell") is False:
        found.append("the loss did not fall")
    for key, value in result.items():
        if key != "tried":  # a failed try before an agreeing one is the fallback working
            found += step_failures(value)
    return found


# -- report -------------------------------------------------------------------------------------


def step_outcome(result: dict) -> str:
    if "skipped" in result:
        return f"skipped: {result['skipped']}"
    failures = step_failures(result)
    return "FAILED: " + "; ".join(failures)[:300] if failures else "ok"


def summary_table(record: dict) -> str:
    steps = record["steps"]
    env = steps.get("environment", {})
    lines = [
        f"gpu_check on {env.get('gpu', record['device'])}: torch {env.get('torch')}, "
        f"timm {env.get('timm')}, triton {env.get('triton')}, {record.get('elapsed_s')} s",
        "",
        "| Model (batch 1) | FPS | paper (H100) | ours / paper | median ms | peak MiB | option |",
        "|---|---|---|---|---|---|---|",
    ]
    if record["device"] == "cpu":
        lines[1:1] = ["CPU dry run at tiny sizes: it tests this script; no figure is comparable."]
    rows = {}
    fast = [m for m in steps.get("fast_path", {}).get("variants", []) if m.get("agrees")]
    if fast:
        best = max(fast, key=lambda m: m["fps"])
        rows["EoMT-L 640"] = {**best, "paper_fps": paper_fps("EoMT-L 640")}
    for step in ("headline", "table"):
        rows.update({k: v for k, v in steps.get(step, {}).items() if isinstance(v, dict)})
    if isinstance(steps.get("videomt", {}).get(VIDEOMT), dict):
        rows[f"{VIDEOMT} (per frame)"] = steps["videomt"][VIDEOMT]
    for name, row in rows.items():
        if "fps" not in row:
            why = row.get("skipped") or row.get("error") or "no agreeing option"
            lines.append(f"| {name} | {why[:60]} | | | | | |")
            continue
        option = f"{row['compile_mode']}, {row['sdpa_backend']}, {row['precision']}"
        ratio = row["fps"] / row["paper_fps"]
        lines.append(
            f"| {name} | {row['fps']:.1f} | {row['paper_fps']} | {ratio:.2f} | "
            f"{row['median_ms']:.2f} | {row['peak_memory_mb']:.0f} | {option} |"
        )
    if "eomt_over_m2f" in steps.get("headline", {}):
        paper = paper_fps("EoMT-L 640") / paper_fps("M2F-L 640")
        lines.append(
            f"\nEoMT-L / M2F-L 640: {steps['headline']['eomt_over_m2f']}x (paper {paper:.1f}x)"
        )
    videomt = steps.get("videomt", {})
    if "videomt_frame_over_eomt_image_ms" in videomt:
        image = videomt["EoMT-L 640 w/o masking"]
        lines.append(
            f"VidEoMT-L 640 frame / EoMT-L 640 image (no masking, {image['precision']}): "
            f"{videomt['videomt_frame_over_eomt_image_ms']}x the time "
            f"({videomt[VIDEOMT]['median_ms']:.2f} / {image['median_ms']:.2f} ms)"
        )
    merging = steps.get("token_merging", {})
    if "speedup" in merging:
        paper = merging["paper_images_per_second"]
        lines.append(
            f"EoMT-L Cityscapes 1024, {merging['batch_windows']} windows, token merging: "
            f"{merging['images_per_second_plain']} -> {merging['images_per_second_merged']} "
            f"images/s ({merging['speedup']}x; paper {paper['plain']} -> {paper['merged']})"
        )
    matmul = steps.get("matmul", {})
    if "tflops" in matmul:
        lines.append(f"matmul {matmul['dtype']} {matmul['size']}^3: {matmul['tflops']:.3g} TFLOP/s")
    for batch in steps.get("batched", {}).get("batches", []):
        if "images_per_second" in batch:
            share = batch.get("share_of_matmul_ceiling")
            lines.append(
                f"EoMT-L 640 batch {batch['batch_size']} ({batch['precision']}): "
                f"{batch['images_per_second']:.1f} images/s, {batch['achieved_tflops']} TFLOP/s"
                + (f" = {100 * share:.1f}% of the matmul rate" if share else "")
            )
    training = steps.get("training", {})
    if "iterations_per_second" in training:
        lines.append(
            f"training EoMT-L 640, {training['batch_size']} images, masked: "
            f"{training['iterations_per_second']:.2f} it/s, peak "
            f"{training['peak_memory_mb']:.0f} MiB, "
            f"loss forward {100 * training['loss_fraction']:.0f}% of a step"
        )
    for name in ("tests", "demo", "onnx"):
        if name in steps:
            lines.append(f"{name}: {json.dumps(steps[name])[:300]}")
    lines += ["", "| Step | seconds | outcome |", "|---|---|---|"]
    for name, result in steps.items():
        lines.append(f"| {name} | {result.get('step_seconds', '')} | {step_outcome(result)} |")
    failed = record.get("failed_steps", [])
    lines.append(f"\nFAILED steps: {', '.join(failed)}" if failed else "\nNo step failed.")
    return "\n".join(lines)


def run_checks(device: str, output: Path, budget_s: float, steps=STEPS) -> dict:
    """Runs `steps` (in STEPS' order), saving the record to OUTPUT/gpu_check.json after each,
    then prints the table; returns the record, whose `failed_steps` names the steps that
    failed."""
    run = Run(device, output, budget_s)
    run.record["failed_steps"] = []
    for name in STEPS:
        if name not in steps:
            continue
        if run.out_of_time():
            run.record["steps"][name] = {"skipped": "time budget"}
            continue
        print(f"[{run.elapsed():6.1f} s] {name}", flush=True)
        start = time.perf_counter()
        try:
            result = STEP_FUNCTIONS[name](run)
        except Exception as error:  # recorded: the later steps still run
            result = {"error": f"{type(error).__name__}: {error}"[:1000]}
        result["step_seconds"] = round(time.perf_counter() - start, 1)
        run.record["steps"][name] = result
        if step_failures(result):
            run.record["failed_steps"].append(name)
        run.save()
    run.save()
    print(summary_table(run.record), flush=True)
    return run.record


def exit_status(record: dict) -> int:
    """1 when a step failed, else 0."""
    return 1 if record.get("failed_steps") else 0
