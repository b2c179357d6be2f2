"""Checkpoints: written atomically, read without unpickling arbitrary objects."""

import os
import tempfile
from pathlib import Path

import torch
from torch import nn

LAST_CHECKPOINT = "last_checkpoint"  # file in the output dir naming the newest checkpoint


def save_atomic(obj, path: str | Path) -> None:
    """torch.save to a temporary file beside `path`, flushed to disk, then renamed over it:
    a reader sees the old file or the complete new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_training_state(output_dir: str | Path, iteration: int, state: dict) -> Path:
    """Write `model_{iteration:07d}.pth`, then point `last_checkpoint` at it."""
    output_dir = Path(output_dir)
    path = output_dir / f"model_{iteration:07d}.pth"
    save_atomic(state, path)
    pointer = output_dir / LAST_CHECKPOINT
    tmp = pointer.with_suffix(".tmp")
    tmp.write_text(path.name)
    os.replace(tmp, pointer)
    return path


def last_checkpoint(output_dir: str | Path) -> Path | None:
    pointer = Path(output_dir) / LAST_CHECKPOINT
    if not pointer.is_file():
        return None
    path = Path(output_dir) / pointer.read_text().strip()
    if not path.is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which does not exist")
    return path


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot be read as a weights-only checkpoint: {e}") from e


def model_state_dict(checkpoint: dict) -> dict:
    """The model's weights in a checkpoint: ours keep them under 'model'."""
    return checkpoint["model"] if isinstance(checkpoint.get("model"), dict) else checkpoint


def load_checkpoint(model: nn.Module, path: str | Path, strict: bool = True) -> dict:
    """Load model weights from `path`; report mismatches clearly.

    With `strict=False`, keys missing from the file or of another shape (say, a class head
    for another number of classes) keep their initialisation and are returned in the report.
    """
    state = model_state_dict(read_checkpoint(path))
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
        lines = [f"{path}: does not match the model"]
        for kind in ("missing", "unexpected"):
            if report[kind]:
                lines.append(f"  {kind} ({len(report[kind])}): {_summarise(report[kind])}")
        for key, (theirs, ours) in wrong_shape.items():
            lines.append(f"  wrong shape: {key}: file {theirs}, model {ours}")
        lines.append("  (pass strict=False to load the matching part only)")
        raise ValueError("\n".join(lines))
    loadable = {k: v for k, v in state.items() if k in own and k not in wrong_shape}
    model.load_state_dict(loadable, strict=False)
    return report


def _summarise(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
