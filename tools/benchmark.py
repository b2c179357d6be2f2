"""Params, GFLOPs and FPS of models built from configs, with random weights (nothing downloaded).

    python tools/benchmark.py --config-file configs/coco/panoptic/eomt_large_640.yaml
    python tools/benchmark.py --config-file CFG1 CFG2 --table
    python tools/benchmark.py --config-file CFG --fps --device cuda --compile
    python tools/benchmark.py --config-file CFG --fps --device cuda --compile max-autotune \
        --sdpa-backend cudnn --weights-dtype bf16
    python tools/benchmark.py --config-file CFG --fps --device cuda --autocast none  # pure fp32
    python tools/benchmark.py --config-file CFG model.masked_attn=always   # EoMT w/ masking
    python tools/benchmark.py --config-file CFG --fps --run masking_masking >> bench.jsonl
    python tools/benchmark.py --config-file CFG --cpu-profile --warmup 1 --iterations 2
    python tools/benchmark.py --config-file CFG model.name=videomt model.masked_attn=never --fps

One JSON line per config (or, with --table, one markdown table). GFLOPs: fvcore's count of the
inference forward at batch 1 (see eomt/benchmark.py); semantic configs count every window of a
typical validation image (--image-size to choose another). FPS on CUDA runs float32 weights
under bf16 autocast unless --weights-dtype or --autocast says otherwise; the line's
"precision" says what ran. --cpu-profile reports instead where the CPU time of one forward goes:
GFLOPs, milliseconds and the fraction of the measured float32 matmul rate of each kind of work
(linear, attention, convolution, other), as one JSON line or --table. A VidEoMT config
(model.name videomt) is counted and timed per video frame: one streaming step, the queries
carried from a previous frame in and the next frame's out (eomt.benchmark.VideoStep).
"""

import argparse
import json

from eomt.benchmark import KINDS, benchmark, cpu_profile
from eomt.cli import ToolParser, run_tool
from eomt.config import get_cfg
from eomt.deploy.runtime import add_runtime_arguments, check_runtime_arguments


def parse_args(argv=None):
    parser = ToolParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config-file", nargs="+", required=True, help="YAML config(s)")
    parser.add_argument("--fps", action="store_true", help="also time the inference forward")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="for --fps")
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward, for --fps")
    add_runtime_arguments(parser, "bf16 on CUDA with fp32 weights, the paper's AMP; else none")
    parser.add_argument("--warmup", type=int, help="warm-up forwards (default: 50 CUDA, 2 CPU)")
    parser.add_argument(
        "--iterations", type=int, help="timed forwards, FPS from the median (500 CUDA, 10 CPU)"
    )
    parser.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        metavar=("HEIGHT", "WIDTH"),
        help="semantic configs: the image whose windows are counted (default: typical val image)",
    )
    parser.add_argument(
        "--no-gflops",
        action="store_true",
        help="skip the FLOP count (without --fps: parameters only, built on the meta device)",
    )
    parser.add_argument(
        "--cpu-profile",
        action="store_true",
        help="GFLOPs, CPU time and share of the matmul rate per kind of op (default: 1 warm-up, "
        "2 profiled forwards)",
    )
    parser.add_argument(
        "--matmul-size", type=int, default=2048, help="--cpu-profile: the matmul rate's size"
    )
    parser.add_argument("--table", action="store_true", help="print a markdown table instead")
    parser.add_argument(
        "--run",
        nargs="+",
        help="one name per config, written as the line's 'run' key (the run or sweep group "
        "tools/report.py --benchmark matches the line to)",
    )
    parser.add_argument(
        "overrides", nargs="*", help="config overrides for every config: key=value (anywhere)"
    )
    args = parser.parse_args(argv)
    # --config-file takes every argument after it: its key=value items are overrides too.
    args.overrides = [item for item in args.config_file if "=" in item] + args.overrides
    args.config_file = [item for item in args.config_file if "=" not in item]
    if not args.config_file:
        parser.error("--config-file: no config file given, only key=value overrides")
    if args.run and len(args.run) != len(args.config_file):
        parser.error(f"--run: {len(args.run)} names for {len(args.config_file)} configs")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    check_runtime_arguments(parser, args)
    if args.cpu_profile and (
        args.fps or args.device != "cpu" or args.batch_size != 1 or args.no_gflops
    ):
        parser.error(
            "--cpu-profile profiles one forward of one image (one window) on the CPU with its "
            "FLOP count: no --fps, --device, --batch-size or --no-gflops"
        )
    if args.cpu_profile and args.image_size:
        parser.error("--cpu-profile profiles one forward at the input size: no --image-size")
    runtime = (
        args.compile != "none" or args.sdpa_backend != "auto" or args.autocast not in (None, "none")
    )
    if args.cpu_profile and (runtime or args.weights_dtype != "fp32"):
        parser.error(
            "--cpu-profile profiles the eager float32 forward: no --compile, --sdpa-backend, "
            "--weights-dtype or --autocast"
        )
    if args.matmul_size < 1:
        parser.error(f"--matmul-size must be at least 1, got {args.matmul_size}")
    return args


def markdown_table(records: list[dict]) -> str:
    lines = [
        "| Config | Params (M) | Trainable (M) | GFLOPs | FPS |",
        "|---|---|---|---|---|",
    ]
    for record in records:
        name = " ".join([record["config"], *record.get("overrides", [])])
        gflops = f"{record['gflops']:.1f}" if "gflops" in record else "-"
        fps = f"{record['fps']:.1f}" if "fps" in record else "-"
        params = f"{record['params'] / 1e6:.1f} | {record['params_trainable'] / 1e6:.1f}"
        lines.append(f"| {name} | {params} | {gflops} | {fps} |")
    return "\n".join(lines)


def profile_table(records: list[dict]) -> str:
    lines = [
        "| Config | Kind | GFLOPs | ms | Share of time | GFLOP/s | Share of matmul rate |",
        "|---|---|---|---|---|---|---|",
    ]
    for record in records:
        name = " ".join([record["config"], *record.get("overrides", [])])
        for kind in KINDS:
            k = record["kinds"][kind]
            lines.append(
                f"| {name} | {kind} | {k['gflops']:.1f} | {k['ms']:.0f} | "
                f"{100 * k['time_fraction']:.0f}% | {k['achieved_gflops_per_s']:.1f} | "
                f"{100 * k['fraction_of_matmul_rate']:.0f}% |"
            )
        lines.append(
            f"| {name} | forward | {record['gflops']:.1f} | {record['forward_ms']:.0f} | 100% | "
            f"{2 * record['gflops'] / record['forward_ms'] * 1000:.1f} | "
            f"matmul rate {record['matmul_gflops_per_s']:.0f} GFLOP/s |"
        )
    return "\n".join(lines)


def main(args) -> None:
    records = []
    for index, config_file in enumerate(args.config_file):
        cfg = get_cfg(config_file, args.overrides)
        record = {"run": args.run[index]} if args.run else {}
        record["config"] = config_file
        if args.overrides:
            record["overrides"] = args.overrides
        if args.cpu_profile:
            record.update(
                cpu_profile(
                    cfg,
                    warmup=1 if args.warmup is None else args.warmup,
                    iterations=2 if args.iterations is None else args.iterations,
                    matmul_size=args.matmul_size,
                )
            )
        else:
            record.update(
                benchmark(
                    cfg,
                    flops=not args.no_gflops,
                    fps=args.fps,
                    device=args.device,
                    batch_size=args.batch_size,
                    compile_mode=args.compile,
                    sdpa_backend=args.sdpa_backend,
                    weights_dtype=args.weights_dtype,
                    autocast=args.autocast,
                    image_size=args.image_size,
                    warmup=args.warmup,
                    iterations=args.iterations,
                )
            )
        if args.table:
            records.append(record)
        else:
            print(json.dumps(record), flush=True)
    if args.table:
        print((profile_table if args.cpu_profile else markdown_table)(records))


if __name__ == "__main__":
    run_tool(main, parse_args)
