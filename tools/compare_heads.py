"""Which head on a plain ViT? Every head on one encoder, trained alike, scored alike (CPU).

    make demo                                 # trains the encoder: the demo's EoMT checkpoint
    python tools/compare_heads.py --encoder output/synthetic_tiny_panoptic/model_0000600.pth
    python tools/compare_heads.py --encoder CKPT --heads linear mlp --encoders frozen

The encoder is the backbone of an EoMT checkpoint (no pretrained weights can be downloaded
here), frozen (`model.frozen_blocks=-1`) or fine-tuned, under each head: EoMT (its last
blocks take the queries), PMT (new blocks on fused taps), and the dense linear, mlp, unet and
dpt heads. Each trains for --iterations on the synthetic data with the demo config's recipe
(configs/synthetic/eomt_tiny_panoptic.yaml), through tools/train_net.py, one process per run
(its output in OUTPUT/<run>/log.txt); a run whose results.json exists is read, not redone, and
an interrupted one resumes from its last checkpoint. EoMT and PMT train on the panoptic split
and are scored for PQ, mIoU and AP; the dense heads train on the semantic labels of the same
images and are scored for mIoU. Then each model's trainable and total parameters, GFLOPs and
CPU latency per image (eomt.benchmark, median of --latency-iterations forwards at the config's
input, float32, this machine's threads). Writes OUTPUT/comparison.{json,md} and a confusion
matrix picture per run (OUTPUT/confusion_<run>.png); prints the table.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from eomt.benchmark import benchmark
from eomt.config import get_cfg
from eomt.report import draw_confusion, read_run
from eomt.sweep import Run, execute, run_state
from eomt.weights import load_model

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/synthetic/eomt_tiny_panoptic.yaml"
HEADS = {  # head -> config overrides
    "eomt": ["test.metrics=[panoptic, semantic, instance]"],
    # PMT's new blocks: as many as EoMT's query blocks in the demo (2).
    "pmt": ["model.name=pmt", "pmt.num_blocks=2", "test.metrics=[panoptic, semantic, instance]"],
    **{
        head: [
            "model.name=dense",
            f"dense.head={head}",
            "task=semantic",
            "dataset.name=synthetic_semantic",
            "test.metrics=[semantic]",
        ]
        for head in ("linear", "mlp", "unet", "dpt")
    },
}
ENCODERS = {"frozen": -1, "fine-tuned": 0}


def extract_encoder(checkpoint: Path, output: Path) -> tuple[Path, dict]:
    """The checkpoint's backbone as a timm state dict file, and its model config keys."""
    model, cfg, _ = load_model(checkpoint)
    path = output / "encoder.safetensors"
    state = {k: v.contiguous() for k, v in model.backbone.state_dict().items()}
    save_file(state, str(path))
    keys = {
        "model.backbone": cfg.model.backbone,
        "model.patch_size": cfg.model.patch_size,
        "model.backbone_kwargs": json.dumps(dict(cfg.model.backbone_kwargs)),
        "input.image_size": json.dumps(list(cfg.input.image_size)),
        "pmt.mlp_dim": model.backbone.embed_dim,  # PMT's new blocks: the authors' MLP width
    }
    return path, keys


def run_overrides(head: str, frozen: int, encoder: Path, keys: dict, args) -> list[str]:
    return [
        *(f"{key}={value}" for key, value in keys.items()),
        f"model.backbone_weights={encoder}",
        "model.pretrained=false",
        f"model.frozen_blocks={frozen}",
        f"dataset.root={args.data}",
        f"solver.max_iter={args.iterations}",
        f"checkpoint_period={args.iterations}",
        "test.num_vis=0",
        *HEADS[head],
    ]


def train(name: str, overrides: list[str], args) -> tuple[dict, list[str]]:
    """Train one run (resumed where it was interrupted), or read it when it has finished."""
    run = Run(name, CONFIG, overrides, Path(args.output) / name)
    command = run.command(sys.executable)[1:]
    if run_state(run).state != "done":
        print(f"[{name}] {' '.join(command)}", flush=True)
        if execute(run, sys.executable, REPO) != 0:
            raise SystemExit(f"run {name} failed: see {run.output_dir / 'log.txt'}")
    return json.loads((run.output_dir / "results.json").read_text()), command


def row(name: str, head: str, encoder: str, results: dict, cfg, args) -> dict:
    measured = benchmark(
        cfg,
        flops=True,
        fps=True,
        device="cpu",
        image_size=tuple(cfg.input.image_size),
        warmup=3,
        iterations=args.latency_iterations,
    )
    semantic = results["semantic"]
    return {
        "run": name,
        "head": head,
        "encoder": encoder,
        "trainable_params": measured["params_trainable"],
        "params": measured["params"],
        "gflops": measured["gflops"],
        "cpu_ms_per_image": measured["latency_ms"],
        "mIoU": semantic["mIoU"],
        "PQ": results.get("panoptic", {}).get("PQ"),
        "AP": results.get("instance", {}).get("AP"),
        "confusion_matrix": semantic["confusion_matrix"],
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| Head | Encoder | Trainable (M) | Total (M) | GFLOPs | CPU ms/image | mIoU | PQ | AP |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        pq = "-" if r["PQ"] is None else f"{r['PQ']:.1f}"
        ap = "-" if r["AP"] is None else f"{r['AP']:.1f}"
        lines.append(
            f"| {r['head']} | {r['encoder']} | {r['trainable_params'] / 1e6:.3f} | "
            f"{r['params'] / 1e6:.3f} | {r['gflops']:.2f} | {r['cpu_ms_per_image']:.1f} | "
            f"{r['mIoU']:.1f} | {pq} | {ap} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--encoder", required=True, help="an EoMT checkpoint (the demo's)")
    parser.add_argument("--data", default="datasets/synthetic", help="the synthetic dataset")
    parser.add_argument("--output", default="output/head_comparison")
    parser.add_argument("--iterations", type=int, default=300, help="training iterations")
    parser.add_argument("--heads", nargs="+", choices=list(HEADS), default=list(HEADS))
    parser.add_argument("--encoders", nargs="+", choices=list(ENCODERS), default=list(ENCODERS))
    parser.add_argument("--latency-iterations", type=int, default=20)
    return parser.parse_args(argv)


def main(args) -> list[dict]:
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    encoder, keys = extract_encoder(Path(args.encoder), output)
    rows, commands = [], {}
    for head in args.heads:
        for encoder_name in args.encoders:
            name = f"{head}_{encoder_name}"
            overrides = run_overrides(head, ENCODERS[encoder_name], encoder, keys, args)
            results, commands[name] = train(name, overrides, args)
            cfg = get_cfg(REPO / CONFIG, overrides)
            rows.append(row(name, head, encoder_name, results, cfg, args))
            draw_confusion([read_run(output / name)], output / f"confusion_{name}.png")
    (output / "comparison.json").write_text(
        json.dumps({"rows": rows, "commands": commands, "threads": torch.get_num_threads()})
    )
    table = markdown(rows)
    (output / "comparison.md").write_text(table + "\n")
    print(table)
    return rows


if __name__ == "__main__":
    main(parse_args())
