"""What VidEoMT costs per video frame against the image EoMT of the same config, and the memory
of streaming a long video; random weights, float32, batch 1, eager, on the CPU.

    python tools/benchmark_video.py --config-file configs/coco/panoptic/eomt_small_640.yaml \\
        --rounds 16
    python tools/benchmark_video.py --config-file configs/synthetic/eomt_tiny_panoptic.yaml \\
        --memory-frames 1000 --frame-size 96 128

Per-frame cost: the config built twice with the same weights, as VidEoMT (model.name videomt)
and as EoMT, both without masked attention; `--rounds` rounds, each timing `--per-round`
forwards of one then of the other (the order alternating), so that a load from other processes
falls on both alike. VidEoMT runs its real stream (`step`, the queries carried from each frame
to the next), EoMT its image forward. One JSON line: the medians and minima, the ratio of the
medians and the median of the rounds' ratios, the load (`uptime`) before and after.

Memory (`--memory-frames N`): a `VideoStream` (panoptic) of the VidEoMT over N frames of
`--frame-size`, the resident memory after 100, N/2 and N frames, and the state's bytes.
"""

import json
import os
import statistics
import time

import torch

from eomt.cli import ToolParser, run_tool
from eomt.config import get_cfg
from eomt.deploy.load_test import resident_mib
from eomt.merging_benchmark import uptime
from eomt.modeling import build_model


def parse_args(argv=None):
    parser = ToolParser(description=__doc__)
    parser.add_argument("--config-file", required=True, help="an EoMT YAML config")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds (0: none)")
    parser.add_argument("--per-round", type=int, default=1, help="forwards per model a round")
    parser.add_argument("--memory-frames", type=int, default=0, metavar="N")
    parser.add_argument("--frame-size", type=int, nargs=2, default=[96, 128], metavar=("H", "W"))
    parser.add_argument("overrides", nargs="*", help="config overrides: key=value")
    args = parser.parse_args(argv)
    if args.rounds < 0 or args.per_round < 1 or args.memory_frames < 0:
        parser.error("--rounds and --memory-frames must be >= 0, --per-round >= 1")
    return args


def models(config: str, overrides: list[str]):
    """(VidEoMT, EoMT) of the config with the same weights, no masked attention."""
    common = ["model.pretrained=false", "model.masked_attn=never", *overrides]
    torch.manual_seed(0)
    cfg = get_cfg(config, [*common, "model.name=videomt"])
    video = build_model(cfg, backbone_weights=False).eval()
    image = build_model(get_cfg(config, common), backbone_weights=False).eval()
    image.load_state_dict(video.state_dict(), strict=False)
    return video, image, cfg


@torch.no_grad()
def frame_cost(video, image, size, rounds: int, per_round: int) -> dict:
    frames = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0))
    times = {"eomt": [], "videomt": []}
    queries = None
    image(frames)  # warm-up
    _, queries = video.step(frames, queries)
    before = uptime()
    for index in range(rounds):
        order = ("eomt", "videomt") if index % 2 == 0 else ("videomt", "eomt")
        for name in order:
            for _ in range(per_round):
                start = time.perf_counter()
                if name == "eomt":
                    image(frames)
                else:
                    _, queries = video.step(frames, queries)
                times[name].append(1000 * (time.perf_counter() - start))
    ratios = [
        statistics.median(times["videomt"][i : i + per_round])
        / statistics.median(times["eomt"][i : i + per_round])
        for i in range(0, len(times["eomt"]), per_round)
    ]
    return {
        **{f"{name}_median_ms": round(statistics.median(t), 1) for name, t in times.items()},
        **{f"{name}_min_ms": round(min(t), 1) for name, t in times.items()},
        "ratio_of_medians": round(
            statistics.median(times["videomt"]) / statistics.median(times["eomt"]), 4
        ),
        "median_of_round_ratios": round(statistics.median(ratios), 4),
        "rounds": rounds,
        "per_round": per_round,
        "threads": torch.get_num_threads(),
        "load_before": before,
        "load_after": uptime(),
    }


def stream_memory(video, cfg, frames: int, size) -> dict:
    from eomt.deploy.predictor import Predictor
    from eomt.deploy.video import VideoStream

    categories = [
        {"id": i, "name": f"class {i}", "isthing": int(i % 2 == 0), "color": [i % 256, 90, 200]}
        for i in range(cfg.model.num_classes)
    ]
    stream = VideoStream(Predictor(video, cfg, categories, device="cpu"), "panoptic")
    pictures = [torch.rand(3, *size, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    marks = {}
    start = time.perf_counter()
    for index in range(frames):
        stream.predict(pictures[index % 4])
        if index + 1 in (100, frames // 2, frames):
            marks[index + 1] = round(resident_mib(os.getpid()), 1)
    return {
        "frames": frames,
        "frame_size": list(size),
        "rss_mib_after_frames": marks,
        "state_bytes": {k: v.nbytes for k, v in stream.state_tensors().items()},
        "seconds": round(time.perf_counter() - start, 1),
    }


def main(args) -> dict:
    video, image, cfg = models(args.config_file, args.overrides)
    record = {"config": args.config_file, "overrides": args.overrides}
    record["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    if args.rounds:
        size = tuple(cfg.input.image_size)
        record["frame_cost"] = frame_cost(video, image, size, args.rounds, args.per_round)
    if args.memory_frames:
        record["memory"] = stream_memory(video, cfg, args.memory_frames, args.frame_size)
    print(json.dumps(record), flush=True)
    return record


if __name__ == "__main__":
    run_tool(main, parse_args)
