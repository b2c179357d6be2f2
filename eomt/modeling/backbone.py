"""Plain ViT backbones from timm, and the token embedding EoMT runs before the blocks."""

from pathlib import Path

import timm
import torch
from torch import nn


def build_vit(
    name: str,
    img_size: tuple[int, int],
    patch_size: int = 16,
    pretrained: bool = False,
    weights: str = "",
    **kwargs,
) -> nn.Module:
    """A timm ViT at `img_size` with `patch_size`, without a classifier head.

    Weights come from the hub (`pretrained`) or from a local file (`weights`). Either way timm's
    checkpoint filter resamples the patch embedding to `patch_size` (FlexiViT-style) and resizes
    the position embeddings to the grid of `img_size`.
    """
    if weights:
        if not Path(weights).is_file():
            raise FileNotFoundError(f"backbone weights file not found: {weights}")
        kwargs["pretrained_cfg_overlay"] = dict(file=str(weights))
        pretrained = True
    vit = timm.create_model(
        name,
        pretrained=pretrained,
        img_size=tuple(img_size),
        patch_size=patch_size,
        num_classes=0,
        **kwargs,
    )
    if not hasattr(vit, "blocks") or not hasattr(vit, "_pos_embed"):
        raise ValueError(f"timm model '{name}' is not a plain ViT (no blocks / _pos_embed)")
    # Models pooled by averaging (EVA-02) keep their last LayerNorm as `fc_norm`, after the
    # pooling: here it normalises the tokens, and no parameter is left without a gradient.
    if isinstance(vit.norm, nn.Identity) and not isinstance(
        getattr(vit, "fc_norm", nn.Identity()), nn.Identity
    ):
        vit.norm, vit.fc_norm = vit.fc_norm, nn.Identity()
    return vit


def embed_tokens(vit: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Normalised images -> (prefix and patch tokens, rotary embedding or None).

    timm's ViT returns the tokens from `_pos_embed`; its EVA family (EVA-02, DINOv3) returns
    the tokens and a rotary embedding, which every block then takes as `rope`.
    """
    x = vit.patch_embed(images)
    out = vit._pos_embed(x)
    x, rope = out if isinstance(out, tuple) else (out, None)
    return vit.norm_pre(x), rope
