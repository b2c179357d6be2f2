"""Training checkpoints: the whole training state, written atomically, found again to resume."""

import os
import re
from pathlib import Path

from eomt.weights.files import save_atomic

LAST_CHECKPOINT = "last_checkpoint"  # file in the output dir naming the newest checkpoint


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


def checkpoint_iteration(path: str | Path) -> int | None:
    """The iteration in a training checkpoint's name (model_0000600.pth), else None."""
    found = re.fullmatch(r"model_(\d{7})\.pth", Path(path).name)
    return int(found.group(1)) if found else None


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
