"""Load on tools/serve.py against the in-process Predictor, on the same images (docs/serving.md).

    python tools/benchmark_serve.py --weights output/synthetic_tiny_panoptic/model_0000600.pth \\
        --images datasets/synthetic/val/images --output output/benchmark_serve.json

Rows: the Predictor in this process at batch 1 and at --max-batch (reading the files and
predicting; per-batch latency); the server (a subprocess on 127.0.0.1) with batching off
(--max-batch 1) and on, each under --clients concurrent clients for --requests requests or
--seconds; then, on the batching server, 4x its queue capacity in clients (503s expected, no
timeouts) and --memory-requests requests with its resident memory before and after. Client
and server share this machine's cores; the clients run on one event loop.
"""

import argparse
import json
import tempfile
from pathlib import Path

from eomt.cli import USER_ERRORS, ToolParser, run_tool
from eomt.deploy.load_test import ServerProcess, free_port, in_process, resident_mib, run_load
from eomt.deploy.predictor import Predictor, find_images

COLUMNS = (
    "requests",
    "ok",
    "503",
    "errors",
    "timeouts",
    "images_per_s",
    "p50_ms",
    "p95_ms",
    "p99_ms",
)


def parse_args(argv=None):
    parser = ToolParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--images", required=True, help="a folder, an image or a glob")
    parser.add_argument("--task", choices=("panoptic", "semantic", "instance"))
    parser.add_argument("--count", type=int, default=64, help="images used (cycled)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=1000, help="per load phase")
    parser.add_argument("--seconds", type=float, default=120, help="per load phase, at most")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=10)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--memory-requests", type=int, default=5000)
    parser.add_argument("--output", help="JSON file of the rows")
    return parser.parse_args(argv)


def main(args) -> dict:
    paths = find_images(args.images)[: args.count]
    bodies = [path.read_bytes() for path in paths]
    predictor = Predictor.from_checkpoint(args.weights, device="cpu")
    task = args.task or predictor.cfg.task
    rounds = max(1, args.requests // (2 * len(paths)))  # about half a load phase of images
    rows = {
        "in-process, batch 1": in_process(predictor, paths, 1, task, rounds),
        f"in-process, batch {args.max_batch}": in_process(
            predictor, paths, args.max_batch, task, rounds
        ),
    }
    del predictor  # the server runs in its own process
    common = ["--weights", args.weights, "--device", "cpu", "--max-queue", str(args.max_queue)]
    if args.task:
        common += ["--task", args.task]
    # The servers' output beside the rows, or in the temporary folder without --output.
    log = Path(args.output or Path(tempfile.gettempdir(), "benchmark_serve")).with_suffix(
        ".server.log"
    )
    phase = dict(max_requests=args.requests, max_seconds=args.seconds)

    with ServerProcess(common + ["--max-batch", "1"], free_port(), log) as server:
        run_load(f"{server.url}/predict", bodies, args.clients, 2 * args.clients, 60)  # warm-up
        rows[f"served, batch 1, {args.clients} clients"] = run_load(
            f"{server.url}/predict", bodies, args.clients, **phase
        ).row()

    batching = ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
    with ServerProcess(common + batching, free_port(), log) as server:
        url = f"{server.url}/predict"
        run_load(url, bodies, args.clients, 2 * args.clients, 60)
        rows[f"served, batch {args.max_batch}, {args.clients} clients"] = run_load(
            url, bodies, args.clients, **phase
        ).row()
        before = resident_mib(server.process.pid)
        samples = []

        def sample(sent: int) -> None:
            if sent % 250 == 0:
                samples.append(resident_mib(server.process.pid))

        memory = run_load(url, bodies, args.clients, args.memory_requests, 3600, on_request=sample)
        after = resident_mib(server.process.pid)
        rows[f"served, batch {args.max_batch}, {args.memory_requests} requests"] = memory.row()
        overload_clients = 4 * args.max_queue
        rows[f"served, batch {args.max_batch}, {overload_clients} clients (4x queue)"] = run_load(
            url, bodies, overload_clients, **phase
        ).row()

    memory_row = {
        "before_mib": round(before, 1),
        "after_mib": round(after, 1),
        "max_mib": round(max(samples + [after]), 1),
        "growth": round(after / before - 1, 4),
    }
    report = {"images": len(paths), "task": task, "rows": rows, "resident_memory": memory_row}
    lines = [
        "| | " + " | ".join(COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(str(row.get(c, "")) for c in COLUMNS) + " |")
    print("\n".join(lines))
    print(
        f"server resident memory over {args.memory_requests} requests: {before:.1f} MiB -> "
        f"{after:.1f} MiB ({100 * memory_row['growth']:+.1f}%), at most {memory_row['max_mib']}"
    )
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    run_tool(main, parse_args, user_errors=(*USER_ERRORS, RuntimeError))  # a server that died
