"""Time of the Hungarian matcher and of the loss with matching, at the paper's shapes.

    python tools/benchmark_loss.py                       # COCO panoptic ViT-L 640, one thread
    python tools/benchmark_loss.py --threads 2 --rounds 20 --depths 5

Random inputs of a training step of one image: `--queries` queries, mask logits at 1/4 of
`--input` (160 x 160 at 640), `--classes` classes, `--targets` binary target masks at the input
size, `--points` sampled points. `matcher`: one call of the matcher (one image, no gradients);
`loss`: the loss over `--depths` supervised predictions (a matching each) and its backward. One
JSON line each: median, fastest and slowest of `--rounds` timed calls after one warm-up call.
"""

import argparse
import json
import statistics
import time

import torch

from eomt.modeling.criterion import MaskClassificationLoss


def random_step(queries, classes, targets, size, depths, seed=0):
    """Predictions (one dict per depth, logits at 1/4 of `size`) and one image's targets."""
    generator = torch.Generator().manual_seed(seed)
    side = size // 4
    predictions = [
        {
            "mask_logits": torch.randn(1, queries, side, side, generator=generator),
            "class_logits": torch.randn(1, queries, classes + 1, generator=generator),
        }
        for _ in range(depths)
    ]
    target = {
        "masks": torch.rand(targets, size, size, generator=generator) > 0.5,
        "labels": torch.randint(0, classes, (targets,), generator=generator),
    }
    return predictions, [target]


def _timed(call, rounds: int) -> dict:
    call()  # warm-up
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return {
        "median_ms": round(1000 * statistics.median(seconds), 2),
        "min_ms": round(1000 * min(seconds), 2),
        "max_ms": round(1000 * max(seconds), 2),
        "rounds": rounds,
    }


def benchmark(args) -> list[dict]:
    criterion = MaskClassificationLoss(args.classes, num_points=args.points)
    predictions, targets = random_step(
        args.queries, args.classes, args.targets, args.input, args.depths
    )
    final = predictions[-1]

    def match():
        criterion.matcher(final["mask_logits"], final["class_logits"], targets)

    def loss_and_backward():
        leaves = [{k: v.clone().requires_grad_() for k, v in p.items()} for p in predictions]
        criterion(leaves, targets)["loss"].backward()

    shapes = {
        "queries": args.queries,
        "mask_logits": [args.input // 4] * 2,
        "targets": args.targets,
        "target_size": [args.input] * 2,
        "points": args.points,
        "threads": torch.get_num_threads(),
    }
    return [
        {"run": "matcher", **shapes, **_timed(match, args.rounds)},
        {"run": "loss", "depths": args.depths, **shapes, **_timed(loss_and_backward, args.rounds)},
    ]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--classes", type=int, default=133)
    parser.add_argument("--targets", type=int, default=8, help="target masks of the image")
    parser.add_argument("--input", type=int, default=640, help="input side in pixels")
    parser.add_argument("--points", type=int, default=12544)
    parser.add_argument("--depths", type=int, default=4, help="supervised predictions")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        records = benchmark(args)
    finally:  # a caller in this process keeps its threads (and its numbers)
        torch.set_num_threads(threads)
    for record in records:
        print(json.dumps(record), flush=True)
    return records


if __name__ == "__main__":
    main()
