"""EoMT weights in the layouts of other implementations, and official DINOv3 deltas.

The same weights in three layouts:

ours      `eomt.modeling.EoMT` / `PMT`: `backbone.*` is a timm ViT (DINOv2) or Eva (DINOv3).
official  the authors' release (tue-mps/eomt `pytorch_model.bin`, or a Lightning `.ckpt` that
          holds it under `state_dict`): `network.*`. Its DINOv2 backbone is timm's ViT; its DINOv3
          backbone is transformers' DINOv3ViTModel with the names their code gives it
          (`patch_embed.{cls_token,register_tokens,patch_embeddings}`, `blocks.N.attention.*`),
          and those files store the fine-tuned weights minus the initial ones (deltas).
          PMT's (tue-mps/pmt) has the same encoder under `network.encoder.backbone.*` (absent from
          its release files, which hold the decoder only), `network.bn.*` (the taps' BatchNorm)
          and `network.decoder.*` (fusion, queries, DINOv3-style blocks, heads).
hf        transformers' `EomtForUniversalSegmentation` (DINOv2) and
          `EomtDinov3ForUniversalSegmentation` (DINOv3); they normalise images outside the model.
          `VideomtForUniversalSegmentation` (VidEoMT, DINOv2) adds `query_updater.*`.
videomt   the VidEoMT authors' detectron2 checkpoints (tue-mps/videomt, `{"model": ...}`): the
          meta-architecture's `backbone.*` holds the model, `backbone.encoder.backbone.*` its ViT
          (timm's DINOv2, or transformers' DINOv3 with the names of the official DINOv3 layout),
          `backbone.q.weight` the queries; `criterion.*` is the loss's. The image statistics are
          not stored (their config's PIXEL_MEAN / PIXEL_STD, ImageNet's on 0-255 in every config).

DINOv3 backbone weights, the base of deltas, come in transformers', Meta's or timm's layout.
Every conversion only renames, splits or concatenates tensors, so outputs stay equal.
"""

import timm
import torch

from eomt.modeling.eomt import IMAGENET_MEAN, IMAGENET_STD

OURS, OFFICIAL, HF, VIDEOMT = "ours", "official", "hf", "videomt"

OFFICIAL_BACKBONE = "network.encoder.backbone."
# Official names outside the backbone -> ours (first matching prefix wins).
OFFICIAL_HEAD_RENAMES = (
    ("network.encoder.pixel_mean", "pixel_mean"),
    ("network.encoder.pixel_std", "pixel_std"),
    ("network.q.", "queries."),
    ("network.", ""),
)
HF_HEAD_RENAMES = (
    ("query.", "queries."),
    ("class_predictor.", "class_head."),
    ("mask_head.fc1.", "mask_head.0."),
    ("mask_head.fc2.", "mask_head.2."),
    ("mask_head.fc3.", "mask_head.4."),
    ("layernorm.", "backbone.norm."),
    ("attn_mask_probs", "attn_mask_probs"),
    ("upscale_block.block.", "upscale."),
)
VIDEOMT_BACKBONE = "backbone.encoder.backbone."
# The VidEoMT authors' names outside the ViT -> ours (first matching prefix wins).
VIDEOMT_RENAMES = (("backbone.q.", "queries."), ("backbone.", ""))
# PMT's names outside the encoder and the new blocks -> ours (first matching prefix wins).
PMT_DECODER = "network.decoder."
PMT_RENAMES = (
    ("network.encoder.pixel_mean", "pixel_mean"),
    ("network.encoder.pixel_std", "pixel_std"),
    ("network.bn.", "tap_norms."),
    ("network.decoder.lateral_projections.", "lateral_mlps."),
    ("network.decoder.scalers.", "lateral_scales."),
    ("network.decoder.q.", "queries."),
    (PMT_DECODER, ""),
)
# Keys that hold no weights of the model: the loss's class weights and fixed rotary tables.
IGNORED_KEYS = ("criterion.empty_weight", "embeddings.mask_token")
IGNORED_PARTS = ("rope_embeddings.", "network.rope.")

# One transformer block, transformers' names -> timm's, besides q/k/v and gated MLPs.
VIT_BLOCK_RENAMES = {  # HF EoMT layer -> timm VisionTransformer block
    "norm1.": "norm1.",
    "norm2.": "norm2.",
    "attention.out_proj.": "attn.proj.",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1.": "mlp.fc1.",
    "mlp.fc2.": "mlp.fc2.",
    "mlp.down_proj.": "mlp.fc2.",
}
EVA_BLOCK_RENAMES = {  # HF DINOv3 layer -> timm Eva block
    "norm1.": "norm1.",
    "norm2.": "norm2.",
    "attention.o_proj.": "attn.proj.",
    "layer_scale1.lambda1": "gamma_1",
    "layer_scale2.lambda1": "gamma_2",
    "mlp.down_proj.": "mlp.fc2.",
}


def detect_format(state: dict, source: str = "checkpoint") -> str:
    """'ours', 'official', 'hf' or 'videomt', from the key names."""
    if any(k.startswith("network.") for k in state):
        return OFFICIAL
    if is_videomt_layout(state):
        return VIDEOMT
    if "query.weight" in state and any(k.startswith("layers.") for k in state):
        return HF
    # Ours: EoMT / PMT / Mask2Former queries, or a dense head on our backbone.
    if "queries.weight" in state or (
        "pixel_mean" in state and any(k.startswith("head.") for k in state)
    ):
        return OURS
    shown = ", ".join(list(state)[:5])
    raise ValueError(
        f"{source}: not EoMT weights: expected 'queries.weight' (this codebase), "
        f"'network.q.weight' (official release), 'backbone.q.weight' (VidEoMT authors') or "
        f"'query.weight' (Hugging Face); "
        f"found keys such as {shown}"
    )


def to_ours(
    state: dict, source: str = "checkpoint", pixel_mean=IMAGENET_MEAN, pixel_std=IMAGENET_STD
) -> dict:
    """Weights in any of the three layouts -> ours (`pixel_mean` / `pixel_std`: the image
    statistics of HF weights, whose image processor normalises)."""
    state = {
        k.replace("._orig_mod", ""): v  # torch.compile's wrapper, in Lightning checkpoints
        for k, v in state.items()
        if k not in IGNORED_KEYS and not any(p in k for p in IGNORED_PARTS)
    }
    fmt = detect_format(state, source)
    if fmt == OFFICIAL:
        return official_to_ours(state)
    if fmt == HF:
        return hf_to_ours(state, pixel_mean, pixel_std)
    if fmt == VIDEOMT:
        return videomt_to_ours(state)
    return state


# -- official ------------------------------------------------------------------------------------


def official_to_ours(state: dict) -> dict:
    """EoMT's or PMT's official weights -> ours."""
    out = {"backbone." + k: v for k, v in _official_backbone_to_timm(state).items()}
    if any(k.startswith(PMT_DECODER) for k in state):
        blocks = split_blocks(state, PMT_DECODER + "blocks.")
        for index, block in blocks.items():
            out.update({f"blocks.{index}.{k}": v for k, v in _block_to_timm(block, True).items()})
        renames, skip = PMT_RENAMES, PMT_DECODER + "blocks."
    else:
        renames, skip = OFFICIAL_HEAD_RENAMES, OFFICIAL_BACKBONE
    for key, value in state.items():
        if not key.startswith((OFFICIAL_BACKBONE, skip)) and key not in IGNORED_KEYS:
            out[_rename(key, renames)] = value
    return out


def ours_to_official(state: dict) -> dict:
    """Our EoMT or PMT weights -> the authors' layout (tue-mps/eomt, tue-mps/pmt)."""
    backbone = strip_prefix(state, "backbone.")
    if is_eva(backbone):
        backbone = _timm_backbone_to_hf(backbone, "patch_embed.", "blocks.", "norm.", eva=True)
    out = {OFFICIAL_BACKBONE + k: v for k, v in backbone.items()}
    pmt = is_pmt(state)
    if pmt:
        for index, block in split_blocks(state, "blocks.").items():
            prefix = f"{PMT_DECODER}blocks.{index}."
            out.update({prefix + k: v for k, v in _block_to_hf(block, eva=True).items()})
    inverse = [(new, old) for old, new in (PMT_RENAMES if pmt else OFFICIAL_HEAD_RENAMES)[:-1]]
    default = PMT_DECODER if pmt else "network."
    for key, value in state.items():
        if not key.startswith("backbone.") and not (pmt and key.startswith("blocks.")):
            renamed = _rename(key, inverse)
            out[renamed if renamed != key else default + key] = value
    return out


def is_pmt(state: dict) -> bool:
    """Our PMT's weights: the taps' BatchNorm."""
    return any(k.startswith("tap_norms.") for k in state)


def _official_backbone_to_timm(state: dict, prefix: str = OFFICIAL_BACKBONE) -> dict:
    backbone = strip_prefix(state, prefix)
    if "patch_embed.patch_embeddings.weight" in backbone:  # transformers' DINOv3ViTModel
        backbone = _hf_backbone_to_timm(backbone, "patch_embed.", "blocks.", "norm.", eva=True)
    return backbone


# -- the VidEoMT authors' ------------------------------------------------------------------------


def is_videomt_layout(state: dict) -> bool:
    """The VidEoMT authors' detectron2 layout: their ViT wrapper or queries under `backbone.`."""
    return "backbone.q.weight" in state or any(k.startswith(VIDEOMT_BACKBONE) for k in state)


def videomt_to_ours(state: dict) -> dict:
    """The VidEoMT authors' checkpoint (a trained model, or the image "segmenter" weights
    their training starts from) -> ours, with ImageNet's statistics (their configs' PIXEL_MEAN
    and PIXEL_STD / 255); the loss's buffers (`criterion.*`) are left out."""
    backbone = _official_backbone_to_timm(state, VIDEOMT_BACKBONE)
    out = {"backbone." + k: v for k, v in backbone.items()}
    for key, value in state.items():
        if not key.startswith((VIDEOMT_BACKBONE, "criterion.")):
            out[_rename(key, VIDEOMT_RENAMES)] = value
    out["pixel_mean"] = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    out["pixel_std"] = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return out


def ours_to_videomt(state: dict) -> dict:
    """Our VidEoMT weights -> the VidEoMT authors' layout (their meta-architecture's state dict,
    without the loss's buffers), which holds no image statistics: ImageNet's only."""
    for key, value in (("pixel_mean", IMAGENET_MEAN), ("pixel_std", IMAGENET_STD)):
        if key in state and not torch.allclose(state[key].flatten(), torch.tensor(value)):
            raise ValueError(
                f"the VidEoMT authors' layout keeps no image statistics (their configs use "
                f"ImageNet's): this model's {key} is {state[key].flatten().tolist()}"
            )
    backbone = strip_prefix(state, "backbone.")
    if is_eva(backbone):
        backbone = _timm_backbone_to_hf(backbone, "patch_embed.", "blocks.", "norm.", eva=True)
    out = {VIDEOMT_BACKBONE + k: v for k, v in backbone.items()}
    for key, value in state.items():
        if key == "queries.weight":
            out["backbone.q.weight"] = value
        elif not key.startswith("backbone.") and key not in ("pixel_mean", "pixel_std"):
            out["backbone." + key] = value
    return out


# -- Hugging Face --------------------------------------------------------------------------------


def hf_to_ours(state: dict, pixel_mean=IMAGENET_MEAN, pixel_std=IMAGENET_STD) -> dict:
    """HF weights -> ours; the image normalisation HF leaves to its image processor becomes the
    model's `pixel_mean` / `pixel_std` buffers."""
    eva = "embeddings.patch_embeddings.weight" in state
    body = {k: v for k, v in state.items() if k.startswith(("embeddings.", "layers."))}
    backbone = _hf_backbone_to_timm(body, "embeddings.", "layers.", None, eva=eva)
    out = {"backbone." + k: v for k, v in backbone.items()}
    for key, value in state.items():
        if key not in body:
            key = _rename(key, HF_HEAD_RENAMES)
            if key.startswith("upscale."):  # the ScaleBlock's LayerNorm2d
                key = key.replace(".layernorm2d.", ".norm.")
            out[key] = value
    out["pixel_mean"] = torch.tensor(pixel_mean, dtype=torch.float32).view(1, 3, 1, 1)
    out["pixel_std"] = torch.tensor(pixel_std, dtype=torch.float32).view(1, 3, 1, 1)
    return out


def ours_to_hf(state: dict) -> dict:
    """Our weights -> HF; `pixel_mean` / `pixel_std` go to the image processor's config."""
    if is_pmt(state):
        raise ValueError("transformers has no PMT model: convert PMT to ours or official")
    backbone = strip_prefix(state, "backbone.")
    norm = strip_prefix(backbone, "norm.")
    body = {k: v for k, v in backbone.items() if not k.startswith("norm.")}
    if not is_eva(body) and "blocks.0.ls1.gamma" not in body:
        raise ValueError("the Hugging Face EoMT needs layer scale (ls1/ls2) in every block")
    out = _timm_backbone_to_hf(body, "embeddings.", "layers.", None, eva=is_eva(body))
    out.update({"layernorm." + k: v for k, v in norm.items()})
    inverse = [(new, old) for old, new in HF_HEAD_RENAMES if not new.startswith("backbone.")]
    for key, value in state.items():
        if key.startswith("backbone.") or key in ("pixel_mean", "pixel_std"):
            continue
        if key.startswith("upscale."):
            key = key.replace(".norm.", ".layernorm2d.")
        out[_rename(key, inverse)] = value
    return out


# -- backbones -----------------------------------------------------------------------------------


def _hf_backbone_to_timm(state: dict, embed: str, blocks: str, norm: str | None, eva: bool) -> dict:
    """Embeddings, blocks (and final norm) in transformers' names -> timm's."""
    renames = {
        embed + "cls_token": "cls_token",
        embed + "register_tokens": "reg_token",
        embed + "patch_embeddings.projection.": "patch_embed.proj.",
        embed + "patch_embeddings.": "patch_embed.proj.",
    }
    if norm:
        renames[norm] = "norm."
    out = {}
    for index, block in split_blocks(state, blocks).items():
        out.update({f"blocks.{index}.{k}": v for k, v in _block_to_timm(block, eva).items()})
    for key, value in state.items():
        if key.startswith(blocks):
            continue
        if key == embed + "position_embeddings.weight":
            out["pos_embed"] = value[None]
        else:
            out[_rename(key, tuple(renames.items()))] = value
    return out


def _timm_backbone_to_hf(state: dict, embed: str, blocks: str, norm: str | None, eva: bool) -> dict:
    renames = [
        ("cls_token", embed + "cls_token"),
        ("reg_token", embed + "register_tokens"),
        (
            "patch_embed.proj.",
            embed + ("patch_embeddings." if eva else "patch_embeddings.projection."),
        ),
    ]
    if norm:
        renames.append(("norm.", norm))
    out = {}
    for index, block in split_blocks(state, "blocks.").items():
        out.update({f"{blocks}{index}.{k}": v for k, v in _block_to_hf(block, eva).items()})
    for key, value in state.items():
        if key.startswith("blocks."):
            continue
        if key == "pos_embed":
            if value.shape[0] != 1:
                raise ValueError(f"pos_embed of shape {tuple(value.shape)}: expected (1, N, C)")
            out[embed + "position_embeddings.weight"] = value[0]
        else:
            out[_rename(key, renames)] = value
    return out


def _block_to_timm(block: dict, eva: bool) -> dict:
    """One block: separate q, k, v projections (or the authors' fused `qkv_proj`) -> timm's
    fused qkv; gated MLP halves -> timm's."""
    block = dict(block)
    attn = "attention."
    if f"{attn}qkv_proj.weight" in block:  # fuse_dinov3_qkv_projections of tue-mps/pmt
        (
            block[f"{attn}q_proj.weight"],
            block[f"{attn}k_proj.weight"],
            block[f"{attn}v_proj.weight"],
        ) = block.pop(f"{attn}qkv_proj.weight").chunk(3)
        if f"{attn}qkv_proj.bias" in block:
            for n, bias in zip("qkv", block.pop(f"{attn}qkv_proj.bias").chunk(3)):
                block[f"{attn}{n}_proj.bias"] = bias
    out = {"attn.qkv.weight": torch.cat([block.pop(f"{attn}{n}_proj.weight") for n in "qkv"])}
    if eva:
        # timm's Eva has no key bias: it adds the same amount to all scores of a query, which
        # the softmax cancels, so dropping it changes nothing.
        block.pop(f"{attn}k_proj.bias", None)
        for n in "qv":
            if f"{attn}{n}_proj.bias" in block:
                out[f"attn.{n}_bias"] = block.pop(f"{attn}{n}_proj.bias")
    elif f"{attn}q_proj.bias" in block:
        out["attn.qkv.bias"] = torch.cat([block.pop(f"{attn}{n}_proj.bias") for n in "qkv"])
    gated = "mlp.gate_proj.weight" in block
    for suffix in ("weight", "bias"):
        if not gated:
            if eva and f"mlp.up_proj.{suffix}" in block:
                out[f"mlp.fc1.{suffix}"] = block.pop(f"mlp.up_proj.{suffix}")
        elif eva:
            out[f"mlp.fc1_g.{suffix}"] = block.pop(f"mlp.gate_proj.{suffix}")
            out[f"mlp.fc1_x.{suffix}"] = block.pop(f"mlp.up_proj.{suffix}")
        else:  # timm's packed SwiGLU computes act(first half) * second half
            gate, up = block.pop(f"mlp.gate_proj.{suffix}"), block.pop(f"mlp.up_proj.{suffix}")
            out[f"mlp.fc1.{suffix}"] = torch.cat([gate, up])
    renames = tuple((EVA_BLOCK_RENAMES if eva else VIT_BLOCK_RENAMES).items())
    out.update({_rename(k, renames): v for k, v in block.items()})
    return out


def _block_to_hf(block: dict, eva: bool) -> dict:
    block = dict(block)
    attn = "attention."
    q, k, v = block.pop("attn.qkv.weight").chunk(3)
    out = {f"{attn}q_proj.weight": q, f"{attn}k_proj.weight": k, f"{attn}v_proj.weight": v}
    if "attn.qkv.bias" in block:
        for n, bias in zip("qkv", block.pop("attn.qkv.bias").chunk(3)):
            out[f"{attn}{n}_proj.bias"] = bias
    for n in "qv":
        if f"attn.{n}_bias" in block:
            out[f"{attn}{n}_proj.bias"] = block.pop(f"attn.{n}_bias")
    gated = vit_mlp_is_gated(block, prefix="")
    for suffix in ("weight", "bias"):
        if eva and f"mlp.fc1_g.{suffix}" in block:
            out[f"mlp.gate_proj.{suffix}"] = block.pop(f"mlp.fc1_g.{suffix}")
            out[f"mlp.up_proj.{suffix}"] = block.pop(f"mlp.fc1_x.{suffix}")
        elif eva and f"mlp.fc1.{suffix}" in block:
            out[f"mlp.up_proj.{suffix}"] = block.pop(f"mlp.fc1.{suffix}")
        elif gated and f"mlp.fc1.{suffix}" in block:
            gate, up = block.pop(f"mlp.fc1.{suffix}").chunk(2)
            out[f"mlp.gate_proj.{suffix}"], out[f"mlp.up_proj.{suffix}"] = gate, up
    renames = EVA_BLOCK_RENAMES if eva else VIT_BLOCK_RENAMES
    inverse = [(new, old) for old, new in renames.items() if not (old == "mlp.fc2." and gated)]
    if gated:
        inverse.append(("mlp.fc2.", "mlp.down_proj."))
    out.update({_rename(k, inverse): v for k, v in block.items()})
    return out


def vit_mlp_is_gated(state: dict, prefix: str = "blocks.0.") -> bool:
    """timm ViT's packed SwiGLU: fc1 has twice the rows fc2 has columns."""
    fc1, fc2 = state.get(prefix + "mlp.fc1.weight"), state.get(prefix + "mlp.fc2.weight")
    return fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]


def is_eva(backbone: dict) -> bool:
    """timm's Eva (DINOv3): layer scale `gamma_1` and rotary positions instead of `pos_embed`."""
    return "blocks.0.gamma_1" in backbone or (
        "pos_embed" not in backbone and "blocks.0.attn.qkv.weight" in backbone
    )


def split_blocks(state: dict, prefix: str) -> dict[int, dict]:
    """The weights of each block `{prefix}N.*`, by N, under the names inside the block."""
    blocks: dict[int, dict] = {}
    for key, value in state.items():
        if key.startswith(prefix):
            index, rest = key[len(prefix) :].split(".", 1)
            blocks.setdefault(int(index), {})[rest] = value
    return dict(sorted(blocks.items()))


def strip_prefix(state: dict, prefix: str) -> dict:
    """The weights under `prefix`, without it."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _rename(key: str, renames) -> str:
    for old, new in renames:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


# -- delta weights (official DINOv3 release) -----------------------------------------------------


def is_delta(state: dict) -> bool:
    """Official DINOv3 files hold fine-tuned minus initial weights; the image statistics never
    change in training, so their `pixel_mean` delta is zero (in absolute weights it is not)."""
    mean = state.get("pixel_mean")
    return mean is not None and not bool(mean.any())


def apply_delta(delta: dict, base_backbone: dict, source: str = "checkpoint") -> dict:
    """Absolute weights (ours) = the initial model the official code adds the deltas to (the
    DINOv3 backbone, ImageNet statistics, attention-mask probabilities of 1, zeros elsewhere)
    + `delta` (ours). `base_backbone` holds timm backbone keys (see `base_backbone_weights`)."""
    initial = {
        "pixel_mean": torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
        "pixel_std": torch.tensor(IMAGENET_STD).view(1, 3, 1, 1),
    }
    out = {}
    for key, value in delta.items():
        if key.startswith("backbone."):
            name = key[len("backbone.") :]
            base = base_backbone.get(name)
            if base is None and name.endswith(("attn.q_bias", "attn.v_bias")):
                base = torch.zeros_like(value)  # timm's DINOv3 without qkv bias: zero biases
            if base is None:
                raise ValueError(f"{source}: the base backbone weights have no '{name}'")
            if base.shape != value.shape:
                raise ValueError(
                    f"{source}: '{name}' is {tuple(value.shape)} in the deltas but "
                    f"{tuple(base.shape)} in the base backbone weights"
                )
            out[key] = base.to(value.dtype) + value
        elif key in initial:
            out[key] = initial[key].to(value.dtype) + value
        elif key == "attn_mask_probs":
            out[key] = 1 + value
        else:
            out[key] = value
    return out


def base_backbone_weights(state: dict, backbone) -> dict:
    """DINOv3 backbone weights from transformers (`embeddings.*`, `layer.N.*`), Meta's release
    (`storage_tokens`, fused qkv) or timm -> timm keys of `backbone`."""
    if any(k.startswith(("layer.", "model.layer.")) for k in state):
        blocks = "model.layer." if any(k.startswith("model.layer.") for k in state) else "layer."
        state = {k: v for k, v in state.items() if k not in ("embeddings.mask_token",)}
        state = {k: v for k, v in state.items() if "rope_embeddings." not in k}
        return _hf_backbone_to_timm(state, "embeddings.", blocks, "norm.", eva=True)
    if "storage_tokens" in state:
        return timm.models.eva.checkpoint_filter_fn(state, backbone)
    return state
