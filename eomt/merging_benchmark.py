"""What ALGM token merging saves, side by side with the same model without it, on the CPU.

`tools/benchmark_token_merging.py` is its command line. For each image: fvcore GFLOPs (counted
as `eomt.benchmark.count_flops` does, attention products included), summed over the image's
inference windows (semantic: square windows along the long side, `eomt.inference`), since
what merges depends on the content; the tokens left after each merge; and CPU milliseconds of
the forward of all the image's windows as one batch, as `predict_semantic_windows` runs them.
Timings alternate between the two models (A B, then B A) so that a load from other processes
falls on both alike; the ratio of their medians is the speed-up, and `uptime`'s load averages
before and after are reported.

The street scenes are synthetic (`street_scene`): sky, buildings, road and pavement in large
flat regions, with a few cars, people, poles and signs, the kind of picture Cityscapes holds.
"""

import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from eomt.benchmark import count_flops
from eomt.inference import resize_and_pad, window_starts


def _fill(image: torch.Tensor, top: int, left: int, bottom: int, right: int, color) -> None:
    image[:, max(top, 0) : max(bottom, 0), max(left, 0) : max(right, 0)] = torch.tensor(
        color, dtype=image.dtype
    )[:, None, None]


def street_scene(height: int = 1024, width: int = 2048, seed: int = 0) -> torch.Tensor:
    """A synthetic street (3, height, width) in [0, 1]: a sky gradient, a row of buildings
    with windows, pavements and a road with lane marks, then cars, people, poles and signs;
    a little pixel noise on top."""
    rng = np.random.default_rng(seed)
    image = torch.empty(3, height, width)
    horizon = int(height * rng.uniform(0.45, 0.55))
    # Sky: a vertical gradient from deep to pale blue.
    t = torch.linspace(0, 1, horizon)[None, :, None]
    sky_top, sky_low = torch.tensor([0.35, 0.55, 0.85]), torch.tensor([0.75, 0.85, 0.95])
    image[:, :horizon] = sky_top[:, None, None] * (1 - t) + sky_low[:, None, None] * t
    # Buildings: flat facades of varying heights and colours, some with a grid of windows.
    x = 0
    while x < width:
        w = int(rng.uniform(0.08, 0.25) * width)
        top = int(horizon * rng.uniform(0.1, 0.6))
        color = rng.uniform(0.35, 0.75) * np.array([1.0, rng.uniform(0.85, 1), rng.uniform(0.7, 1)])
        _fill(image, top, x, horizon, x + w, color.tolist())
        if rng.random() < 0.5:
            step_y = int(rng.uniform(0.04, 0.07) * height)
            step_x = int(rng.uniform(0.03, 0.05) * width)
            for wy in range(top + step_y // 2, horizon - step_y, step_y):
                for wx in range(x + step_x // 3, x + w - step_x // 2, step_x):
                    _fill(image, wy, wx, wy + step_y // 2, wx + step_x // 2, (0.15, 0.2, 0.25))
        x += w
    # Pavements and road, with dashed lane marks.
    kerb = horizon + int((height - horizon) * 0.12)
    _fill(image, horizon, 0, kerb, width, (0.62, 0.6, 0.58))
    _fill(image, kerb, 0, height, width, (0.33, 0.33, 0.35))
    mark_y = kerb + (height - kerb) // 2
    for mx in range(0, width, width // 12):
        _fill(image, mark_y, mx, mark_y + height // 100, mx + width // 24, (0.9, 0.9, 0.9))
    # Things: cars on the road, people on the pavement, poles with signs.
    for _ in range(int(rng.integers(3, 6))):
        cw, ch = int(rng.uniform(0.08, 0.14) * width), int(rng.uniform(0.08, 0.12) * height)
        cx, cy = int(rng.uniform(0, width - cw)), int(rng.uniform(kerb, height - ch * 1.2))
        _fill(image, cy, cx, cy + ch, cx + cw, rng.uniform(0.05, 0.9, 3).tolist())
        _fill(image, cy - ch // 3, cx + cw // 5, cy, cx + 4 * cw // 5, (0.2, 0.25, 0.3))
        for wheel in (cx + cw // 6, cx + 4 * cw // 6):
            _fill(image, cy + ch - ch // 5, wheel, cy + ch + ch // 6, wheel + cw // 7, (0.05,) * 3)
    for _ in range(int(rng.integers(2, 6))):
        pw, ph = int(0.012 * width), int(rng.uniform(0.1, 0.16) * height)
        px, py = int(rng.uniform(0, width - pw)), int(rng.uniform(horizon, kerb)) - ph // 2
        _fill(image, py, px, py + ph // 2, px + pw, rng.uniform(0.1, 0.9, 3).tolist())
        _fill(image, py + ph // 2, px, py + ph, px + pw, (0.15, 0.15, 0.3))
        _fill(image, py - ph // 8, px + pw // 4, py, px + 3 * pw // 4, (0.85, 0.65, 0.5))
    for _ in range(int(rng.integers(2, 4))):
        px = int(rng.uniform(0, width - 10))
        top = int(horizon * rng.uniform(0.3, 0.7))
        _fill(image, top, px, kerb, px + max(width // 300, 2), (0.3, 0.3, 0.3))
        _fill(image, top, px - 12, top + 28, px + 16, (0.85, 0.1, 0.1))
    noise = torch.from_numpy(rng.normal(0, 0.01, (3, height, width)).astype(np.float32))
    return (image + noise).clamp(0, 1)


def image_windows(image: torch.Tensor, cfg) -> torch.Tensor:
    """The model inputs (n, 3, h, w) of one image as inference makes them: square windows along
    the long side of the short side resized (semantic), else the padded image."""
    if cfg.task != "semantic":
        return resize_and_pad(image, tuple(cfg.input.image_size))[0][None]
    window = cfg.input.image_size[0]
    height, width = image.shape[-2:]
    scale = window / min(height, width)
    size = (round(height * scale), round(width * scale))
    resized = F.interpolate(image[None], size, mode="bilinear", antialias=True)[0]
    long_dim = 1 if size[0] > size[1] else 2
    starts = window_starts(size[long_dim - 1], window)
    return torch.stack([resized.narrow(long_dim, start, window) for start in starts])


def merged_counts(model: nn.Module) -> list[list[int]]:
    """The tokens each window kept after each merge of the model's last forward."""
    merging = getattr(model, "token_merging", None)
    if merging is None or not merging.last_counts:
        return []
    return [counts.tolist() for _, counts in merging.last_counts]


def image_flops(model: nn.Module, windows: torch.Tensor) -> int:
    """fvcore multiply-adds of all the windows of one image, counted window by window."""
    return sum(count_flops(model, window[None])["flops"] for window in windows)


def uptime() -> str:
    """The load averages (1, 5, 15 minutes) and the CPU count."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} on {os.cpu_count()} CPUs"


def _synchronize(batch: torch.Tensor) -> None:
    """Wait for the GPU's queued work, so that a time is the forward's (nothing on the CPU)."""
    if batch.is_cuda:
        torch.cuda.synchronize(batch.device)


@torch.no_grad()
def interleaved_times(
    models: dict[str, nn.Module], inputs: list[torch.Tensor], rounds: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Milliseconds of each model's forward on each of `inputs`, over `rounds` rounds in
    which the models take turns (the order reversed every other round); `warmup` untimed
    forwards of each first."""
    names = list(models)
    for name in names:
        for _ in range(warmup):
            models[name](inputs[0])
    times = {name: [] for name in names}
    for index in range(rounds):
        order = names if index % 2 == 0 else names[::-1]
        for batch in inputs:
            for name in order:
                _synchronize(batch)
                start = time.perf_counter()
                models[name](batch)
                _synchronize(batch)
                times[name].append(1000 * (time.perf_counter() - start))
    return times


def compare(
    plain: nn.Module,
    merged: nn.Module,
    cfg,
    images: list[torch.Tensor],
    rounds: int = 3,
    warmup: int = 1,
    flops: bool = True,
) -> dict:
    """GFLOPs, tokens and CPU ms per image of `plain` and `merged` (the same weights, eval
    mode) on `images`, each run as inference would run it (`image_windows`)."""
    plain.eval(), merged.eval()
    inputs = [image_windows(image, cfg) for image in images]
    result = {
        "images": len(images),
        "image_size": (
            list(images[0].shape[-2:])
            if len({tuple(image.shape[-2:]) for image in images}) == 1
            else "mixed"
        ),
        "windows_per_image": inputs[0].shape[0],
        "window_size": list(inputs[0].shape[-2:]),
        "threads": torch.get_num_threads(),
        "load_before": uptime(),
    }
    tokens = []
    with torch.no_grad():
        for batch in inputs:
            merged(batch)
            tokens.append(merged_counts(merged))
    grid = plain.backbone.patch_embed.grid_size
    result["patch_tokens_per_window"] = grid[0] * grid[1]
    # Mean tokens per window after each merge.
    if tokens and tokens[0]:
        result["tokens_after_merges"] = [
            round(statistics.fmean(t for image in tokens for t in image[step]), 1)
            for step in range(len(tokens[0]))
        ]
    if flops:
        plain_flops = [image_flops(plain, batch) for batch in inputs]
        merged_flops = [image_flops(merged, batch) for batch in inputs]
        result["gflops_plain"] = round(statistics.fmean(plain_flops) / 1e9, 3)
        result["gflops_merged"] = round(statistics.fmean(merged_flops) / 1e9, 3)
        result["gflops_ratio"] = round(sum(plain_flops) / sum(merged_flops), 3)
    times = interleaved_times({"plain": plain, "merged": merged}, inputs, rounds, warmup)
    result["ms_per_image_plain"] = round(statistics.median(times["plain"]), 1)
    result["ms_per_image_merged"] = round(statistics.median(times["merged"]), 1)
    result["speedup"] = round(result["ms_per_image_plain"] / result["ms_per_image_merged"], 3)
    pairs = [p / m for p, m in zip(times["plain"], times["merged"])]
    result["speedup_per_pair"] = {
        "median": round(statistics.median(pairs), 3),
        "min": round(min(pairs), 3),
        "max": round(max(pairs), 3),
    }
    result["timed_forwards_each"] = len(times["plain"])
    result["load_after"] = uptime()
    return result


UNMERGED_TINT = (1.0, 0.55, 0.0)
GLOBAL_TINT = (0.0, 0.35, 1.0)


def merge_picture(
    model: nn.Module, image: torch.Tensor, cfg, path: str | Path, scale: float = 0.5
) -> Path:
    """Save a picture of what merged: above, the image's windows side by side as a mosaic in
    which every token is painted with the mean colour of its pixels and outlined in light
    lines, tinted orange where a patch stayed alone, untinted where one window merged
    locally (its size is the window's), blue where global merging made it (any other size);
    below, the windows themselves. Runs `model` (with token merging) on the image's windows;
    the picture is `scale` times their size."""
    from PIL import Image

    windows = image_windows(image, cfg)
    with torch.no_grad():
        model.eval()(windows)
    state = model.token_merging.last_state
    grid = tuple(model.backbone.patch_embed.grid_size)
    patch = model.backbone.patch_embed.patch_size
    cell = (round(patch[0] * scale), round(patch[1] * scale))
    small = F.interpolate(
        windows, (grid[0] * cell[0], grid[1] * cell[1]), mode="bilinear", antialias=True
    )
    window_area = model.token_merging.window**2
    mosaics = []
    for index, window in enumerate(small):
        assign = state.assign[index]
        token_map = np.kron(assign.reshape(grid).numpy(), np.ones(cell, dtype=np.int64))
        pixels = window.permute(1, 2, 0).reshape(-1, 3)
        flat = torch.from_numpy(token_map).flatten()
        sums = torch.zeros(state.sizes.shape[1], 3).index_add_(0, flat, pixels)
        counts = torch.zeros(state.sizes.shape[1]).index_add_(0, flat, torch.ones(len(flat)))
        mosaic = (sums / counts.clamp(min=1)[:, None])[flat].reshape(*token_map.shape, 3).numpy()
        size = state.sizes[index].numpy()[token_map]
        for tinted, color in (
            (size == 1, UNMERGED_TINT),
            ((size > 1) & (size != window_area), GLOBAL_TINT),
        ):
            mosaic[tinted] = 0.6 * mosaic[tinted] + 0.4 * np.array(color)
        edges = np.zeros(token_map.shape, dtype=bool)
        edges[1:] |= token_map[1:] != token_map[:-1]
        edges[:, 1:] |= token_map[:, 1:] != token_map[:, :-1]
        mosaic[edges] = 0.5 * mosaic[edges] + 0.5
        mosaics.append(mosaic)
    picture = np.concatenate(
        [np.concatenate(mosaics, 1), np.concatenate(list(small.permute(0, 2, 3, 1).numpy()), 1)]
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((picture.clip(0, 1) * 255).round().astype(np.uint8)).save(path)
    return path


def model_pair(cfg, weights: str = "") -> tuple[nn.Module, nn.Module]:
    """The model `cfg` describes without and with token merging (`model.token_merging.*` as
    the config sets it, enabled), the same weights in both: `weights` (a checkpoint) or
    random ones; eval mode."""
    from eomt.config import cfg_from_dict
    from eomt.modeling import build_model

    plain_cfg, merged_cfg = cfg_from_dict(cfg), cfg_from_dict(cfg)
    plain_cfg.model.token_merging.enabled = False
    merged_cfg.model.token_merging.enabled = True
    torch.manual_seed(0)
    plain = build_model(plain_cfg, backbone_weights=False).eval()
    if weights:
        from eomt.weights.load import load_weights

        plain.load_state_dict(load_weights(weights, backbone=plain.backbone))
    merged = build_model(merged_cfg, backbone_weights=False).eval()
    merged.load_state_dict(plain.state_dict())
    return plain, merged


def dataset_images(folder: str | Path, count: int) -> list[torch.Tensor]:
    """The first `count` images of a folder (sorted names), as float tensors (3, H, W)."""
    from eomt.data import load_image

    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".jpg", ".png"))
    if not paths:
        raise FileNotFoundError(f"no .jpg or .png images in {folder}")
    return [load_image(path) for path in paths[:count]]
