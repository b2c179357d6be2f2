"""Weight files: written atomically or as safetensors, read without unpickling arbitrary objects."""

import json
import os
import pickle
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
NOT_A_CHECKPOINT = "truncated or not a checkpoint"


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


@dataclass(frozen=True)
class StoredWeights:
    """A weights file as read: the model's weights in the file's own layout, the config and
    class names ours carry, and the Hugging Face JSON files beside it."""

    path: Path
    state: dict
    cfg: dict | None = None
    categories: list[dict] | None = None
    processor: dict = field(default_factory=dict)  # preprocessor_config.json: image statistics
    hf_config: dict = field(default_factory=dict)  # config.json: input size, heads, class names


def read_weights(path: str | Path, hf_config: bool = False) -> StoredWeights:
    """The weights file `path` (or the one in a Hugging Face folder) with the JSON beside it:
    preprocessor_config.json, and with `hf_config` config.json for a file without our config."""
    path = weights_file(path)
    checkpoint = read_checkpoint(path)
    state = model_state_dict(checkpoint)
    # HF models normalise images in their image processor, whose config may sit beside.
    processor = json_beside(path, "preprocessor_config.json") or json_beside(
        path,
        "video_preprocessor_config.json",  # VidEoMT's video processor
    )
    if isinstance(checkpoint.get("cfg"), dict):
        return StoredWeights(
            path, state, checkpoint["cfg"], checkpoint.get("categories"), processor
        )
    config = json_beside(path, "config.json") if hf_config else {}
    return StoredWeights(path, state, processor=processor, hf_config=config)


def weights_file(path: str | Path) -> Path:
    """`path`, or the weights file inside a Hugging Face model folder."""
    path = Path(path)
    if path.is_dir():
        for name in HF_WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path}: a folder without {' or '.join(HF_WEIGHT_FILES)}")
    return path


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


def model_state_dict(checkpoint: dict) -> dict:
    """The model's weights in a checkpoint: ours keep them under 'model', Lightning's under
    'state_dict'; released weight files are the state dict itself."""
    for key in ("model", "state_dict"):
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    return checkpoint


def json_beside(path: Path, name: str) -> dict:
    """The JSON file `name` in the folder of `path`; {} if there is none."""
    file = path.with_name(name)
    if not file.is_file():
        return {}
    with open(file) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON: {e}") from e


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
