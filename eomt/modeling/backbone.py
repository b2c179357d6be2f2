"""Plain ViT backbones from timm, and the token embedding EoMT runs before the blocks."""

from contextlib import nullcontext
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

    Weights come from the hub (`pretrained`) or from a local file (`weights`: timm's or Meta's
    layout, or transformers' DINOv3 model file, as the PMT authors load their encoder). Either
    way timm's checkpoint filter resamples the patch embedding to `patch_size` (FlexiViT-style)
    and resizes the position embeddings to the grid of `img_size`.
    """
    transformers_state = None
    if weights:
        if not Path(weights).is_file():
            raise FileNotFoundError(f"backbone weights file not found: {weights}")
        from eomt.weights.load import transformers_backbone  # weights build on modeling

        transformers_state = transformers_backbone(weights)
        if transformers_state is None:
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
    if transformers_state is not None:
        family = timm.models.eva if hasattr(vit, "rope") else timm.models.vision_transformer
        state = family.checkpoint_filter_fn(transformers_state, vit)
        # DINOv3's released L/B/H hold all-zero q and v biases, which timm's model without
        # qkv bias leaves out as its own filter does for Meta's files; other biases matter.
        own = vit.state_dict()
        for key in [k for k in state if k.endswith(("attn.q_bias", "attn.v_bias"))]:
            if key not in own:
                if state[key].any():
                    raise ValueError(
                        f"{weights}: {key} is not zero, but timm's {name} has no qkv bias: "
                        "use its _qkvb variant"
                    )
                del state[key]
        vit.load_state_dict(state)
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


def tap_blocks(
    vit: nn.Module, images: torch.Tensor, taps: list[int]
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Normalised images -> (the tokens after each block of `taps`, increasing, each through
    the ViT's final norm, as DINOv2's and DPT's readers take them; the rotary embedding or
    None). Blocks after the last tap are not run; a frozen ViT runs without autograd."""
    frozen = not any(p.requires_grad for p in vit.parameters())
    with torch.no_grad() if frozen else nullcontext():
        x, rope = embed_tokens(vit, images)
        block_kwargs = {} if rope is None else {"rope": rope}
        features = []
        for i, block in enumerate(vit.blocks[: taps[-1] + 1]):
            x = block(x, **block_kwargs)
            if i in taps:
                features.append(vit.norm(x))
    return features, rope


def default_taps(num_blocks: int) -> list[int]:
    """4 evenly spaced blocks ending with the last: 24 -> [5, 11, 17, 23], 12 -> [2, 5, 8, 11];
    every block when there are fewer than 4."""
    if num_blocks < 4:
        return list(range(num_blocks))
    return [num_blocks // 4 - 1, num_blocks // 2 - 1, 3 * num_blocks // 4 - 1, num_blocks - 1]


def freeze_blocks(vit: nn.Module, frozen_blocks: int) -> None:
    """Stop training the embeddings and the first `frozen_blocks` blocks (-1: the whole ViT,
    its final norm included); the optimizer leaves out what no longer needs gradients."""
    num_blocks = len(vit.blocks)
    if not -1 <= frozen_blocks <= num_blocks:
        raise ValueError(
            f"model.frozen_blocks={frozen_blocks}: the backbone has {num_blocks} blocks "
            "(0: train all, -1: freeze all)"
        )
    if frozen_blocks == 0:
        return
    for name, param in vit.named_parameters():
        parts = name.split(".")
        trains = frozen_blocks != -1 and (
            (parts[0] == "blocks" and int(parts[1]) >= frozen_blocks)
            or parts[0] in ("norm", "fc_norm")
        )
        param.requires_grad_(trains)
