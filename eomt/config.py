"""YAML configs: `_BASE_` inheritance, strict keys and types, `key=value` overrides.

Every valid key is listed with its default in `eomt/defaults.yaml`; a key missing there is a
typo, and the error names it with the closest valid keys.
"""

import difflib
import hashlib
import json
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

DEFAULTS_FILE = Path(__file__).with_name("defaults.yaml")
# Keys whose value is a free-form mapping (passed through to another library).
FREE_FORM_KEYS = {"model.backbone_kwargs"}
# Values a key may take, beyond its type: the choices of a string (or of each item of a list),
# and the least value of a number (or of each item of a list of numbers).
CHOICES = {
    "task": ("panoptic", "semantic", "instance", "vis", "vps", "vss"),
    "model.name": ("eomt", "m2f", "pmt", "dense", "videomt"),
    "dense.head": ("linear", "mlp", "unet", "dpt"),
    "model.masked_attn": ("anneal", "always", "never"),
    "model.token_merging.restore": ("mask_head", "query_blocks"),
    "model.token_merging.batch_count": ("own", "min"),
    "m2f.adapter": ("vit_adapter", "simple_pyramid"),
    "m2f.pixel_decoder": ("msdeform", "none"),
    "dataset.bad_samples": ("stop", "skip"),
    "solver.amp": ("bf16", "fp16", "none"),
    "solver.lr_schedule": ("poly", "cosine"),
    "solver.nonfinite_loss": ("stop", "skip"),
    "test.metrics": ("panoptic", "semantic", "instance", "vis", "vps", "vss"),
    "loss.video_matching": ("first_frame", "clip"),
}
MINIMUM = {
    "model.num_classes": 0,  # 0: the dataset's number of classes
    "model.num_queries": 1,
    "model.num_query_blocks": 1,
    "model.frozen_blocks": -1,
    "model.token_merging.window": 2,
    "model.token_merging.local_block": -1,
    "model.token_merging.global_block": -1,
    "pmt.num_blocks": 1,
    "pmt.taps": 0,
    "pmt.mlp_dim": 0,
    "dense.taps": 0,
    "dense.channels": 0,
    "model.patch_size": 1,
    "input.image_size": 1,
    "input.num_frames": 1,
    "input.frame_range": 0,
    "dataset.label_offset": 0,
    "loss.num_points": 1,
    "solver.max_iter": 1,
    "solver.batch_size": 1,
    "solver.batch_size_per_device": 1,
    "solver.warmup_iters": 0,
    "solver.max_skipped_steps": 0,
    "test.eval_period": 0,
    "test.topk": 1,
    "test.batch_size": 1,
    "test.num_vis": 0,
    "test.pq_workers": 0,
    "dataloader.num_workers": 0,
    "checkpoint_period": 1,
    "log_period": 1,
}


# Keys that moved, old -> new: configs, overrides and checkpoints that use the old name still
# read (mask annealing is a training schedule, no longer under model).
MOVED_KEYS = {
    "model.anneal_start": "solver.anneal_start",
    "model.anneal_end": "solver.anneal_end",
    "model.anneal_power": "solver.anneal_power",
}


class ConfigError(ValueError):
    pass


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and path not in FREE_FORM_KEYS:
            flat.update(_flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def _coerce(key: str, value, default, source: str):
    """Return `value` converted to the type of `default`, or raise naming key and source."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    elif isinstance(default, list):
        if isinstance(value, list):
            return value
    elif isinstance(default, dict):
        if isinstance(value, dict):
            return value
    raise ConfigError(
        f"{source}: key '{key}' expects {type(default).__name__} "
        f"(default {default!r}), got {type(value).__name__} {value!r}"
    )


def _check_value(key: str, value, source: str) -> None:
    """Raise naming key and source if `value` is outside the key's CHOICES or MINIMUM."""
    items = value if isinstance(value, list) else [value]
    if key in CHOICES:
        wrong = [item for item in items if item not in CHOICES[key]]
        if wrong:
            raise ConfigError(
                f"{source}: key '{key}' must be one of {', '.join(CHOICES[key])}; got {wrong[0]!r}"
            )
    if key in MINIMUM:
        least = MINIMUM[key]
        wrong = [item for item in items if not isinstance(item, (int, float)) or item < least]
        if wrong:
            raise ConfigError(f"{source}: key '{key}' must be at least {least}; got {value!r}")


def _check_key(key: str, valid: dict, source: str) -> None:
    if key not in valid:
        close = difflib.get_close_matches(key, list(valid), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"{source}: unknown config key '{key}'{hint}")


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def _load_file(path: Path, valid: dict, seen: tuple = ()) -> dict:
    """Flat {key: value} of a config file with its bases applied first."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: _BASE_ cycle through {' -> '.join(map(str, seen))}")
    data = _read_yaml(path)
    bases = data.pop("_BASE_", [])
    values = {}
    for base in [bases] if isinstance(bases, str) else bases:
        values.update(_load_file(path.parent / base, valid, seen + (path,)))
    for key, value in _flatten(data).items():
        _assign(values, key, value, valid, str(path))
    return values


def _assign(values: dict, key: str, value, valid: dict, source: str) -> None:
    """values[key] = value, checked; `a.b=v` under a free-form dict key `a` sets its item b."""
    key = MOVED_KEYS.get(key, key)
    parent, _, item = key.rpartition(".")
    if parent in FREE_FORM_KEYS:
        values[parent] = {**values.get(parent, valid[parent]), item: value}
        return
    _check_key(key, valid, source)
    values[key] = _coerce(key, value, valid[key], source)
    _check_value(key, values[key], source)


def parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def _unflatten(flat: dict) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def get_cfg(
    path: str | Path | None = None, overrides: list[str] | dict | None = None
) -> DictConfig:
    """The defaults, updated by the config file at `path` and then by `overrides`.

    `overrides` is a list of "key=value" strings (as on the command line) or a dict.
    """
    valid = _flatten(_read_yaml(DEFAULTS_FILE))
    values = dict(valid)
    if path is not None:
        values.update(_load_file(Path(path), valid))
    items = (
        overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides or [])
    )
    for key, value in items:
        _assign(values, key, value, valid, "override")
    cfg = OmegaConf.create(_unflatten(values))
    OmegaConf.set_struct(cfg, True)
    return cfg


def config_digest(path: str | Path | None, overrides: list[str]) -> str:
    """A digest of what a config file (with its bases) and overrides set, the defaults left
    out: editing the file or an override changes it, a release that adds a key does not."""
    valid = _flatten(_read_yaml(DEFAULTS_FILE))
    values = _load_file(Path(path), valid) if path is not None else {}
    for key, value in map(parse_override, overrides):
        _assign(values, key, value, valid, "override")
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cfg_from_dict(data: dict | DictConfig) -> DictConfig:
    """Rebuild a config saved as a plain dict (e.g. inside a checkpoint), checked like a file."""
    if isinstance(data, DictConfig):
        data = OmegaConf.to_container(data)
    return get_cfg(overrides=_flatten(data))
