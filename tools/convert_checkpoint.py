"""Convert EoMT weights between this codebase, the official release and Hugging Face.

    # official pytorch_model.bin (or Lightning .ckpt) -> ours, with config and class names inside
    python tools/convert_checkpoint.py pytorch_model.bin eomt_coco.safetensors --to ours \\
        --categories datasets/coco/annotations/panoptic_val2017.json
    # official DINOv3 deltas + the DINOv3 weights they are relative to -> ours
    python tools/convert_checkpoint.py delta.bin eomt.safetensors --to ours \\
        --base-weights dinov3_vitl16.safetensors --image-size 640 640
    # ours -> a transformers folder (EomtForUniversalSegmentation / EomtDinov3...)
    python tools/convert_checkpoint.py output/run/model_0088692.pth hf_model --to hf
    # Hugging Face folder -> ours; ours -> official (VidEoMT: its authors' detectron2 layout)
    python tools/convert_checkpoint.py hf_model eomt.safetensors --to ours
    python tools/convert_checkpoint.py eomt.safetensors pytorch_model.bin --to official

The input may be any layout. The output is written only once it reads back as the same model
(every tensor); a layout that cannot hold the model (the official one records no backbone name,
so only DINOv2 and DINOv3 EoMT read back from it) stops with nothing written. `--check` also
reloads the output and prints the largest difference of its predictions from the input's, with
masked attention on and off.
"""

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from eomt.cli import ToolParser
from eomt.deploy.predictor import read_categories
from eomt.weights import load_model
from eomt.weights.export import is_video, official_state_dict, save_hf
from eomt.weights.files import save_atomic, save_weights


def parse_args(argv=None):
    parser = ToolParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("input", help="checkpoint file or Hugging Face model folder")
    parser.add_argument(
        "output", help="file (ours: .safetensors or .pth; official: .bin) or folder (hf)"
    )
    parser.add_argument("--to", required=True, choices=("ours", "official", "hf"))
    parser.add_argument("--base-weights", help="DINOv3 backbone file of official delta weights")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"))
    parser.add_argument("--num-heads", type=int, help="attention heads, if not 64 channels each")
    parser.add_argument(
        "--categories", help="class names: ade20k, ade20k_panoptic, cityscapes or a COCO JSON"
    )
    parser.add_argument("--check", action="store_true", help="reload and compare predictions")
    return parser.parse_args(argv)


def convert(args) -> Path:
    model, cfg, categories = load_model(
        args.input, args.base_weights, args.image_size, args.num_heads
    )
    if args.categories:
        categories = read_categories(args.categories)
    output = Path(args.output)
    image_size = tuple(cfg.input.image_size)
    # Written beside the output and moved there once it reads back as the same model: a
    # failed conversion leaves nothing, and the output is never half written.
    staging = output.with_name(f".{output.stem}.converting{output.suffix}")
    _remove(staging)
    try:
        write(model, cfg, categories, staging, args.to)
        read_back(model, staging, image_size, args.to)
        _move(staging, output)
    finally:
        _remove(staging)
    if args.check:
        converted = load_model(output, image_size=image_size)[0]
        for masked in (True, False):
            difference = max_difference(model, converted, image_size, masked)
            print(
                f"masked attention {'on ' if masked else 'off'}: max |difference| {difference:.3g}"
            )
    return output


def write(model, cfg, categories, output: Path, layout: str) -> None:
    if layout == "ours":
        if output.suffix == ".safetensors":
            save_weights(model, cfg, categories, output)
        else:
            state = {"model": model.state_dict(), "cfg": OmegaConf.to_container(cfg)}
            save_atomic({**state, "categories": categories}, output)
    elif layout == "official":
        state = official_state_dict(model, cfg.loss.no_object_weight)
        if is_video(model):  # its authors' layout: a detectron2 checkpoint
            state = {"model": state}
        save_atomic(state, output)
    else:
        save_hf(model, categories, output, cfg.loss.no_object_weight)


def read_back(model, path: Path, image_size, layout: str) -> None:
    """The written weights must rebuild the same model (architecture and every tensor)."""
    why = {
        "official": "the official layout does not record the backbone, which is inferred "
        "from the shapes as a DINOv2 or DINOv3 ViT",
        "hf": "the Hugging Face layout holds DINOv2 and DINOv3 EoMT only",
    }.get(layout, "")
    problem = f" ({why})" if why else ""
    try:
        rebuilt = load_model(path, image_size=image_size)[0]
    except Exception as error:  # any failure to rebuild means the file is of no use
        raise ValueError(
            f"the {layout} layout cannot hold this model{problem}: reading it back fails "
            f"({type(error).__name__}: {error}); nothing was written"
        ) from error
    own, theirs = model.state_dict(), rebuilt.state_dict()
    differ = sorted(set(own) ^ set(theirs)) + [
        key
        for key in own.keys() & theirs.keys()
        if own[key].shape != theirs[key].shape
        or not torch.equal(own[key], theirs[key].to(own[key].dtype))
    ]
    if differ:
        raise ValueError(
            f"the {layout} layout cannot hold this model{problem}: read back, it gives another "
            f"model (first differing tensor: {differ[0]}); nothing was written"
        )


def _move(source: Path, target: Path) -> None:
    if target.is_dir() and source.is_dir():
        old = target.with_name(f".{target.name}.replaced")
        _remove(old)
        os.replace(target, old)
        os.replace(source, target)
        _remove(old)
    else:
        os.replace(source, target)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@torch.no_grad()
def max_difference(model, other, image_size, masked: bool, seed: int = 0) -> float:
    """Largest difference between the two models' predictions (every block's while masked
    attention is on) on random images."""
    images = torch.rand(2, 3, *image_size, generator=torch.Generator().manual_seed(seed))
    outputs = []
    for m in (model, other):
        m.eval()
        m.masked_attn = "always" if masked else "anneal"
        m.attn_mask_probs.fill_(1.0)
        outputs.append(m(images))
    return max(
        (a[key] - b[key]).abs().max().item()
        for a, b in zip(*outputs)
        for key in ("mask_logits", "class_logits")
    )


if __name__ == "__main__":
    args = parse_args()
    try:
        print(f"wrote {convert(args)}")
    except (FileNotFoundError, ValueError) as error:  # the message names the problem
        sys.exit(f"error: converting {args.input} to {args.to}: {error}")
