"""Checkpoints: written atomically, read without unpickling arbitrary objects."""

import json
import os
import pickle
import re
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed
from torch import nn

from eomt.config import cfg_from_dict, get_cfg
from eomt.interop import (
    apply_delta,
    base_backbone_weights,
    generic_categories,
    infer_config,
    is_delta,
    to_ours,
)
from eomt.modeling import build_model
from eomt.modeling.eomt import IMAGENET_MEAN, IMAGENET_STD

LAST_CHECKPOINT = "last_checkpoint"  # file in the output dir naming the newest checkpoint
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def save_atomic(obj, path: str | Path) -> None:
    """torch.save to a temporary file beside `path`, flushed to disk, then renamed over it:
    a reader sees the old file or the complete new one, never a partial one. A write that
    fails (a full disk) raises its OSError, which torch's writer would turn into an opaque
    RuntimeError."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _WriteErrorKeeper(f)
            try:
                torch.save(obj, writer)
            except RuntimeError as error:
                if writer.error is None:
                    raise
                raise writer.error from error
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _WriteErrorKeeper:
    """A file for torch.save that keeps the OSError of a failed write."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.file.flush()


def save_training_state(output_dir: str | Path, iteration: int, state: dict) -> Path:
    """Write `model_{iteration:07d}.pth`, then point `last_checkpoint` at it (for people and
    scripts; resuming looks at the files themselves)."""
    output_dir = Path(output_dir)
    path = checkpoint_path(output_dir, iteration)
    save_atomic(state, path)
    pointer = output_dir / LAST_CHECKPOINT
    tmp = pointer.with_suffix(".tmp")
    tmp.write_text(path.name)
    os.replace(tmp, pointer)
    return path


def checkpoint_path(output_dir: str | Path, iteration: int) -> Path:
    return Path(output_dir) / f"model_{iteration:07d}.pth"


def checkpoints_newest_first(output_dir: str | Path) -> list[Path]:
    """The training checkpoints `model_NNNNNNN.pth` in `output_dir`, highest iteration first.
    Each is complete: they only ever appear by an atomic rename."""
    found = Path(output_dir).glob("model_[0-9][0-9][0-9][0-9][0-9][0-9][0-9].pth")
    return sorted(found, reverse=True)


def remove_partial_checkpoints(output_dir: str | Path) -> list[Path]:
    """Delete the temporary files of checkpoints whose writing was interrupted."""
    partial = list(Path(output_dir).glob(".model_*.pth.*.tmp"))
    for path in partial:
        path.unlink(missing_ok=True)
    return partial


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint file as saved; never unpickles anything but tensors and plain containers."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        state, metadata = _read_safetensors(path)
        if "cfg" not in metadata:
            return state
        # Ours (`save_weights`): the config and class names travel as JSON metadata.
        return {
            "model": state,
            "cfg": json.loads(metadata["cfg"]),
            "categories": json.loads(metadata.get("categories", "null")),
        }
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise ValueError(f"{path}: {NOT_A_CHECKPOINT} ({_last_line(e)})") from e
        raise ValueError(
            f"{path}: refused: it holds objects other than tensors and plain containers, and "
            f"only those are unpickled (anything else could run code): {_unpickler_reason(e)}"
        ) from e
    except Exception as e:  # what torch raises for a damaged file varies (zip, EOF, key errors)
        raise ValueError(f"{path}: {NOT_A_CHECKPOINT} ({_describe_read_error(path, e)})") from e


NOT_A_CHECKPOINT = "truncated or not a checkpoint"


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    try:
        state = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            return state, f.metadata() or {}
    except SafetensorError as e:
        raise ValueError(f"{path}: {NOT_A_CHECKPOINT} ({_describe_read_error(path, e)})") from e


def _describe_read_error(path: Path, error: Exception) -> str:
    size = path.stat().st_size
    if size == 0:
        return "the file is empty"
    return f"{size} bytes; {type(error).__name__}: {_last_line(error) or 'no details'}"


def _unpickler_reason(error: Exception) -> str:
    """What torch's weights-only unpickler found, from its long message."""
    found = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\. |\n|$)", str(error))
    return found.group(1) if found else _last_line(error)


def _last_line(error: Exception) -> str:
    """The informative end of a long library message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else ""


def save_weights(model: nn.Module, cfg, categories: list[dict] | None, path: str | Path) -> Path:
    """The model's weights as safetensors (no pickle), with its config and class names as
    metadata, so that `from_checkpoint` and the predictor need nothing else."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": "eomt",
        "cfg": json.dumps(OmegaConf.to_container(cfg) if isinstance(cfg, DictConfig) else cfg),
        "categories": json.dumps(categories),
    }
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=metadata)
    return path


def weights_file(path: str | Path) -> Path:
    """`path`, or the weights file inside a Hugging Face model folder."""
    path = Path(path)
    if path.is_dir():
        for name in HF_WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path}: a folder without {' or '.join(HF_WEIGHT_FILES)}")
    return path


def model_state_dict(checkpoint: dict) -> dict:
    """The model's weights in a checkpoint: ours keep them under 'model', Lightning's under
    'state_dict'; released weight files are the state dict itself."""
    for key in ("model", "state_dict"):
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    return checkpoint


def read_weights(path: str | Path, base_weights: str | Path | None = None, backbone=None) -> dict:
    """The model weights in a checkpoint of any supported layout (ours, the official release,
    Hugging Face), renamed to ours; official DINOv3 deltas are added to `base_weights`."""
    path = weights_file(path)
    return _absolute(_ours(read_checkpoint(path), path), path, base_weights, backbone)


def _ours(checkpoint: dict, path: Path) -> dict:
    state = model_state_dict(checkpoint)
    # HF models normalise images in their image processor, whose config may sit beside.
    processor = _json_beside(path, "preprocessor_config.json")
    return to_ours(
        state,
        str(path),
        processor.get("image_mean", IMAGENET_MEAN),
        processor.get("image_std", IMAGENET_STD),
    )


def _absolute(state: dict, path: Path, base_weights, backbone) -> dict:
    if not is_delta(state):
        return state
    if not base_weights:
        raise ValueError(
            f"{path}: holds delta weights (the official DINOv3 release stores fine-tuned minus "
            "DINOv3 weights); give the DINOv3 backbone weights file they were trained from "
            "(base_weights=... / --base-weights: timm, transformers or Meta's release)"
        )
    base = base_backbone_weights(model_state_dict(read_checkpoint(base_weights)), backbone)
    return apply_delta(state, base, str(path))


def _json_beside(path: Path, name: str) -> dict:
    file = path.with_name(name)
    if not file.is_file():
        return {}
    with open(file) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON: {e}") from e


def load_model(
    path: str | Path,
    base_weights: str | Path | None = None,
    image_size: tuple[int, int] | None = None,
    num_heads: int | None = None,
):
    """(model, cfg, categories) from a checkpoint alone.

    Our checkpoints carry their config and class names. For official and Hugging Face weights
    the architecture is inferred from key names and shapes (`eomt.interop.infer_config`); an HF
    folder's config.json gives the input size, heads and class names. `image_size` and
    `num_heads` override what cannot be read from DINOv3 weights (input size) or from shapes;
    learned position embeddings of another input size are resampled to `image_size`.
    """
    path = weights_file(path)
    checkpoint = read_checkpoint(path)
    state = _ours(checkpoint, path)
    if isinstance(checkpoint.get("cfg"), dict):
        cfg = cfg_from_dict(checkpoint["cfg"])
        if image_size is not None:
            cfg.input.image_size = list(image_size)
        categories = checkpoint.get("categories")
    else:
        hf = _json_beside(path, "config.json")
        if image_size is None and "image_size" in hf:
            side = hf["image_size"]
            image_size = tuple(side) if isinstance(side, list) else (side, side)
        num_heads = num_heads or hf.get("num_attention_heads")
        cfg = get_cfg(overrides=infer_config(state, image_size, num_heads))
        id2label = hf.get("id2label")
        names = [id2label[str(i)] for i in range(len(id2label))] if id2label else None
        categories = generic_categories(cfg.model.num_classes, names)
    model = build_model(cfg, backbone_weights=False)
    state = _fit_pos_embed(_absolute(state, path, base_weights, model.backbone), model.backbone)
    load_state(model, state, True, str(path))
    return model, cfg, categories or generic_categories(cfg.model.num_classes)


def _fit_pos_embed(state: dict, vit) -> dict:
    """Position embeddings of another input size resampled to the model's grid (bicubic)."""
    pos_embed = state.get("backbone.pos_embed")
    if pos_embed is None or pos_embed.shape == vit.pos_embed.shape:
        return state
    prefix = 0 if getattr(vit, "no_embed_class", False) else vit.num_prefix_tokens
    resized = resample_abs_pos_embed(
        pos_embed, new_size=list(vit.patch_embed.grid_size), num_prefix_tokens=prefix
    )
    return {**state, "backbone.pos_embed": resized}


def from_checkpoint(path: str | Path, base_weights: str | Path | None = None, **kwargs):
    """The EoMT model of a checkpoint (ours, official or Hugging Face), built without a
    config; see `load_model` for the keyword arguments."""
    return load_model(path, base_weights, **kwargs)[0]


def load_checkpoint(
    model: nn.Module, path: str | Path, strict: bool = True, base_weights: str | Path | None = None
) -> dict:
    """Load model weights from `path` (ours, official `.bin`/`.ckpt`, Hugging Face
    `.safetensors`/`.bin` or folder); report mismatches clearly, per group of keys.

    With `strict=False`, keys missing from the file or of another shape (say, a class head
    for another number of classes) keep their initialisation and are returned in the report.
    `base_weights`: the DINOv3 backbone file that official DINOv3 deltas are relative to.
    """
    state = read_weights(path, base_weights, getattr(model, "backbone", None))
    return load_state(model, state, strict, str(path))


def load_state(model: nn.Module, state: dict, strict: bool = True, source: str = "weights"):
    """Load a state dict of our layout; the report and errors of `load_checkpoint`."""
    own = model.state_dict()
    wrong_shape = {
        k: (tuple(v.shape), tuple(own[k].shape))
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    }
    report = {
        "missing": sorted(set(own) - set(state)),
        "unexpected": sorted(set(state) - set(own)),
        "wrong_shape": wrong_shape,
    }
    if strict and any(report.values()):
        raise ValueError(
            f"{source}: does not match the model\n"
            + describe_mismatch(report)
            + "\n  (pass strict=False to load the matching part only)"
        )
    loadable = {k: v for k, v in state.items() if k in own and k not in wrong_shape}
    model.load_state_dict(loadable, strict=False)
    return report


def key_group(key: str) -> str:
    """The group a key is reported in: 'backbone.blocks', 'backbone.patch_embed', 'class_head'."""
    parts = key.split(".")
    if parts[0] == "backbone" and len(parts) > 2:
        return f"backbone.{parts[1]}"
    return parts[0]


def describe_mismatch(report: dict, limit: int = 4) -> str:
    """One line per group of keys and kind of mismatch, with counts and a few keys."""
    lines = []
    for kind in ("missing", "unexpected"):
        groups: dict[str, list[str]] = {}
        for key in report[kind]:
            groups.setdefault(key_group(key), []).append(key)
        for group, keys in groups.items():
            lines.append(f"  {group}: {len(keys)} {kind}: {_summarise(keys, limit)}")
    shapes: dict[str, list[str]] = {}
    for key, (theirs, ours) in report["wrong_shape"].items():
        shapes.setdefault(key_group(key), []).append(f"{key}: file {theirs}, model {ours}")
    for group, keys in shapes.items():
        lines.append(f"  {group}: {len(keys)} wrong shape: {_summarise(keys, 2, '; ')}")
    return "\n".join(lines)


def _summarise(keys: list[str], limit: int = 8, separator: str = ", ") -> str:
    shown = separator.join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
