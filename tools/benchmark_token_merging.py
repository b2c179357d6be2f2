"""ALGM token merging side by side with the same model without it: GFLOPs, tokens and CPU ms.

    python tools/benchmark_token_merging.py \
        --config-file configs/cityscapes/semantic/eomt_large_1024.yaml \
        model.backbone=vit_small_patch14_reg4_dinov2 model.num_query_blocks=3 \
        model.pretrained=false --synthetic-val datasets/synthetic \
        --picture docs/token_merging.png --table

Random weights (nothing downloaded) unless --weights / --synthetic-weights name checkpoints.
Street scenes: synthetic 1024 x 2048 images (eomt.merging_benchmark.street_scene) through the
config's inference windows. --synthetic-val: the synthetic dataset's val images (made by
`python datasets/prepare_synthetic.py --output datasets/synthetic`) through --synthetic-config
(default: the demo's tiny model), whose merging keys --synthetic-override sets. Timings
alternate between the two models; the load averages before and after are reported. One JSON
line per set of images, or --table for a markdown table; --picture writes the merged tokens of
the first street scene drawn over it.
"""

import argparse
import json

import torch

from eomt.cli import ToolParser, run_tool
from eomt.config import get_cfg
from eomt.merging_benchmark import compare, dataset_images, merge_picture, model_pair, street_scene

TINY = "configs/synthetic/eomt_tiny_panoptic.yaml"


def parse_args(argv=None):
    parser = ToolParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument(
        "--config-file",
        default="configs/cityscapes/semantic/eomt_large_1024.yaml",
        help="the street scenes' model (default: EoMT-L Cityscapes; overrides pick EoMT-S)",
    )
    parser.add_argument("--weights", default="", help="its checkpoint (default: random)")
    parser.add_argument("--images", type=int, default=2, help="street scenes (default 2; 0: none)")
    parser.add_argument(
        "--size", type=int, nargs=2, default=[1024, 2048], metavar=("HEIGHT", "WIDTH")
    )
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forwards of each model")
    parser.add_argument("--synthetic-val", default="", help="the synthetic dataset's root")
    parser.add_argument("--synthetic-config", default=TINY, help="the model for those images")
    parser.add_argument("--synthetic-weights", default="", help="its checkpoint")
    parser.add_argument("--synthetic-images", type=int, default=20, help="val images (20)")
    parser.add_argument(
        "--synthetic-override",
        nargs="*",
        default=["model.token_merging.global_block=2"],
        help="key=value for the synthetic model (default: global merging in block 2 of its 4 "
        "encoder blocks)",
    )
    parser.add_argument("--picture", default="", help="write the merged tokens picture here")
    parser.add_argument(
        "--picture-only", action="store_true", help="write --picture and measure nothing"
    )
    parser.add_argument(
        "--synthetic-picture", default="", help="the same for the first synthetic val image"
    )
    parser.add_argument("--no-gflops", action="store_true", help="skip the FLOP counts")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: as set)")
    parser.add_argument("--table", action="store_true", help="print a markdown table")
    parser.add_argument("overrides", nargs="*", help="key=value for the street scenes' model")
    args = parser.parse_args(argv)
    if args.synthetic_picture and not args.synthetic_val:
        parser.error("--synthetic-picture needs --synthetic-val")
    if args.picture_only and not args.picture:
        parser.error("--picture-only needs --picture PATH")
    if min(args.rounds, args.synthetic_images) < 1 or args.images < 0:
        parser.error("--rounds and --synthetic-images must be at least 1, --images at least 0")
    if args.images == 0 and (args.picture or not args.synthetic_val):
        parser.error("--images 0 (no street scenes) leaves --synthetic-val only, no --picture")
    return args


def table(records: list[dict]) -> str:
    lines = [
        "| Images | Windows x size | Tokens per window (merges) | GFLOPs | GFLOPs merged | "
        "ms | ms merged | Speed-up (pairs: min-max) | Load before / after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        tokens = " -> ".join(
            str(t) for t in [r["patch_tokens_per_window"]] + r.get("tokens_after_merges", [])
        )
        pairs = r["speedup_per_pair"]
        size = r["image_size"]
        size = f"{size[0]}x{size[1]}" if isinstance(size, list) else f"{size} sizes"
        lines.append(
            f"| {r['name']} ({r['images']}, {size}) | "
            f"{r['windows_per_image']} x {r['window_size'][0]}x{r['window_size'][1]} | {tokens} | "
            f"{r.get('gflops_plain', '-')} | {r.get('gflops_merged', '-')} | "
            f"{r['ms_per_image_plain']:.0f} | {r['ms_per_image_merged']:.0f} | "
            f"{r['speedup']:.2f}x ({pairs['min']:.2f}-{pairs['max']:.2f}) | "
            f"{r['load_before'].split(' on ')[0].removeprefix('load average ')} / "
            f"{r['load_after'].split(' on ')[0].removeprefix('load average ')} |"
        )
    return "\n".join(lines)


def main(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    records = []
    if args.images:
        cfg = get_cfg(args.config_file, args.overrides)
        plain, merged = model_pair(cfg, args.weights)
        images = [street_scene(*args.size, seed=seed) for seed in range(args.images)]
        if args.picture:
            print(f"picture: {merge_picture(merged, images[0], cfg, args.picture)}", flush=True)
            if args.picture_only:
                return
        record = {"name": "street scenes", "config": args.config_file, "overrides": args.overrides}
        record.update(
            compare(plain, merged, cfg, images, args.rounds, args.warmup, not args.no_gflops)
        )
        records.append(record)
        if not args.table:
            print(json.dumps(record), flush=True)
    if args.synthetic_val:
        synthetic_cfg = get_cfg(args.synthetic_config, args.synthetic_override)
        plain, merged = model_pair(synthetic_cfg, args.synthetic_weights)
        images = dataset_images(f"{args.synthetic_val}/images/val", args.synthetic_images)
        if args.synthetic_picture:
            path = merge_picture(merged, images[0], synthetic_cfg, args.synthetic_picture, 3.0)
            print(f"picture: {path}", flush=True)
        record = {
            "name": "synthetic val",
            "config": args.synthetic_config,
            "overrides": args.synthetic_override,
        }
        record.update(
            compare(
                plain, merged, synthetic_cfg, images, args.rounds, args.warmup, not args.no_gflops
            )
        )
        records.append(record)
        if not args.table:
            print(json.dumps(record), flush=True)
    if args.table:
        print(table(records))
        for record in records:
            print(json.dumps(record))


if __name__ == "__main__":
    run_tool(main, parse_args)
