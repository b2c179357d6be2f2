"""The one door for weights: any supported file (ours, the official release, Hugging Face, official
DINOv3 deltas, PMT's Lightning checkpoints and decoder-only release files, the VidEoMT authors'
detectron2 checkpoints) -> weights in our layout, and the model they belong to.

A file goes down through the package once: `files` reads it, `layouts` renames its keys to ours,
`architecture` gives the model's config, `eomt.modeling` builds the model, `load_state` fills it.
Only official DINOv3 deltas and PMT's decoder-only files go back to `files` and `layouts`: the
backbone weights they build on are read and renamed after the model is built, whose backbone
Meta's layout and timm's resampling need.
"""

import warnings
from pathlib import Path

import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from eomt.modeling import build_model
from eomt.modeling.eomt import IMAGENET_MEAN, IMAGENET_STD
from eomt.weights.architecture import model_config
from eomt.weights.files import StoredWeights, model_state_dict, read_checkpoint, read_weights
from eomt.weights.layouts import (
    apply_delta,
    base_backbone_weights,
    is_delta,
    is_eva,
    is_pmt,
    is_videomt_layout,
    split_blocks,
    to_ours,
)

DECODER_ONLY_IMAGE_SIZE = (640, 640)  # when neither the file nor the caller gives one


def load_weights(path: str | Path, base_weights: str | Path | None = None, backbone=None) -> dict:
    """The model weights in a checkpoint of any supported layout (ours, the official release,
    Hugging Face), renamed to ours; official DINOv3 deltas are added to `base_weights`
    (`backbone`: the timm backbone they are for, which Meta's layout of the base needs)."""
    stored = read_weights(path)
    state = _ours(stored)
    if is_delta(state):
        state = _absolute(state, stored.path, base_weights, backbone)
    elif holds_decoder_only(state) and base_weights:
        state = with_encoder(state, _encoder(stored.path, base_weights), backbone)
    return state


def load_model(
    path: str | Path,
    base_weights: str | Path | None = None,
    image_size: tuple[int, int] | None = None,
    num_heads: int | None = None,
    video: bool = False,
    norm_queries: bool | None = None,
):
    """(model, cfg, categories) from a checkpoint alone.

    Our checkpoints carry their config and class names. For official and Hugging Face weights
    the architecture is inferred from key names and shapes
    (`eomt.weights.architecture.infer_config`); an HF folder's config.json gives the input size,
    heads and class names. `image_size` and `num_heads` override what cannot be read from DINOv3
    weights (input size) or from shapes; learned position embeddings of another input size are
    resampled to `image_size`.

    VidEoMT: weights with a query updater (ours, the authors' or Hugging Face's) give VidEoMT;
    so do the authors' "segmenter" weights (their layout without a query updater) and, with
    `video=True`, any EoMT weights: the same ViT, queries and heads, and a freshly initialised
    query updater (with a warning: train it before use). `norm_queries` sets VidEoMT's
    `videomt.norm_queries`, which the weights do not hold (see `infer_config`).
    """
    stored = read_weights(path, hf_config=True)
    video = video or is_videomt_layout(stored.state)
    state = _ours(stored)
    delta = is_delta(state)
    decoder_only = holds_decoder_only(state)
    if decoder_only:
        # The architecture is that of the encoder file; the input size, not kept by DINOv3
        # and not the encoder file's own for DINOv2, is given or the default; the patch size
        # is the decoder's (timm resamples the encoder's to it, as it does in their code).
        encoder = _encoder(stored.path, base_weights)
        cfg, categories = model_config(
            {**state, **{"backbone." + k: v for k, v in encoder.items()}},
            stored,
            image_size or DECODER_ONLY_IMAGE_SIZE,
            num_heads,
        )
        cfg.model.patch_size = 2 ** (len(split_blocks(state, "upscale.")) + 2)
    else:
        cfg, categories = model_config(state, stored, image_size, num_heads, video)
    if norm_queries is not None:
        if cfg.model.name != "videomt":
            raise ValueError(f"{stored.path}: norm_queries is VidEoMT's; these are not its weights")
        cfg.videomt.norm_queries = norm_queries
    model = build_model(cfg, backbone_weights=False)
    if delta:
        state = _absolute(state, stored.path, base_weights, model.backbone)
    elif decoder_only:
        state = with_encoder(state, encoder, model.backbone)
    if cfg.model.name == "videomt":
        state = _with_query_updater(state, model, stored.path)
    load_state(model, _fit_pos_embed(state, model.backbone), True, str(stored.path))
    return model, cfg, categories


def from_checkpoint(path: str | Path, base_weights: str | Path | None = None, **kwargs):
    """The EoMT (or PMT, VidEoMT) model of a checkpoint (ours, official, Hugging Face, the
    VidEoMT authors'), built without a config; see `load_model` for the keyword arguments."""
    return load_model(path, base_weights, **kwargs)[0]


def load_checkpoint(
    model: nn.Module, path: str | Path, strict: bool = True, base_weights: str | Path | None = None
) -> dict:
    """Load model weights from `path` (ours, official `.bin`/`.ckpt`, Hugging Face
    `.safetensors`/`.bin` or folder); report mismatches clearly, per group of keys.

    With `strict=False`, keys missing from the file or of another shape (say, a class head
    for another number of classes) keep their initialisation and are returned in the report.
    `base_weights`: the backbone file that official DINOv3 deltas are relative to, or that a
    PMT decoder-only file (the authors' release) takes its encoder from.
    """
    state = load_weights(path, base_weights, getattr(model, "backbone", None))
    if holds_decoder_only(state):
        _encoder(Path(path), base_weights)  # raises, saying which file to give
    return load_state(model, state, strict, str(path))


def _ours(stored: StoredWeights) -> dict:
    """The stored weights in our layout; HF weights get the image statistics of their image
    processor's config."""
    return to_ours(
        stored.state,
        str(stored.path),
        stored.processor.get("image_mean", IMAGENET_MEAN),
        stored.processor.get("image_std", IMAGENET_STD),
    )


def _with_query_updater(state: dict, model: nn.Module, path: Path) -> dict:
    """VidEoMT weights; those of an image model get the model's new query updater."""
    if "query_updater.weight" in state:
        return state
    warnings.warn(
        f"{path}: no query updater in the weights (EoMT's, or the VidEoMT authors' segmenter "
        "weights): VidEoMT's query updater is freshly initialised, train it before use",
        stacklevel=3,
    )
    new = {"query_updater." + k: v for k, v in model.query_updater.state_dict().items()}
    return {**state, **new}


def _absolute(delta: dict, path: Path, base_weights, backbone) -> dict:
    """Official DINOv3 deltas (ours) added to the DINOv3 backbone file `base_weights`."""
    if not base_weights:
        raise ValueError(
            f"{path}: holds delta weights (the official DINOv3 release stores fine-tuned minus "
            "DINOv3 weights); give the DINOv3 backbone weights file they were trained from "
            "(base_weights=... / --base-weights: timm, transformers or Meta's release)"
        )
    base = model_state_dict(read_checkpoint(base_weights))
    return apply_delta(delta, base_backbone_weights(base, backbone), str(path))


def transformers_backbone(path: str | Path) -> dict | None:
    """The weights of a transformers DINOv3 model file (`embeddings.*`, `layer.N.*`) in timm's
    names, or None for a file of another layout (timm reads those itself)."""
    state = model_state_dict(read_checkpoint(path))
    if not any(k.startswith(("layer.", "model.layer.")) for k in state):
        return None
    return base_backbone_weights(state, None)


def holds_decoder_only(state: dict) -> bool:
    """PMT weights without their encoder: the authors' release files, whose frozen encoder is
    the pretrained one."""
    return is_pmt(state) and not any(k.startswith("backbone.") for k in state)


def _encoder(path: Path, base_weights) -> dict:
    """The encoder weights a PMT decoder-only file builds on, in timm's names (as stored)."""
    if not base_weights:
        raise ValueError(
            f"{path}: holds PMT's decoder only (the authors' release files leave out the frozen "
            "encoder); give the encoder's pretrained weights: base_weights=FILE / "
            "--base-weights FILE (transformers' DINOv3, or timm's DINOv2 or DINOv3)"
        )
    state = model_state_dict(read_checkpoint(base_weights))
    if "storage_tokens" in state:
        raise ValueError(
            f"{base_weights}: Meta's DINOv3 layout; for PMT's decoder-only files give the "
            "encoder in transformers' or timm's layout"
        )
    return base_backbone_weights(state, None)


def with_encoder(state: dict, encoder: dict, backbone) -> dict:
    """A PMT decoder-only state (ours) completed with `encoder` (timm's names), resampled by
    timm to `backbone`'s patch and input size as timm loads pretrained weights, and with the
    image statistics that the release files leave out."""
    family = timm.models.eva if is_eva(encoder) else timm.models.vision_transformer
    encoder = family.checkpoint_filter_fn(encoder, backbone)
    out = {"backbone." + k: v for k, v in encoder.items()}
    out["pixel_mean"] = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    out["pixel_std"] = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return {**out, **state}


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
