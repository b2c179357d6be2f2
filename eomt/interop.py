"""EoMT weights in the layouts of other implementations, and configs inferred from weights.

The same weights in three layouts:

ours      `eomt.modeling.EoMT`: `backbone.*` is a timm ViT (DINOv2) or a timm Eva (DINOv3).
official  the authors' release (tue-mps/eomt `pytorch_model.bin`, or a Lightning `.ckpt` that
          holds it under `state_dict`): `network.*`. Its DINOv2 backbone is timm's ViT; its DINOv3
          backbone is transformers' DINOv3ViTModel with the names their code gives it
          (`patch_embed.{cls_token,register_tokens,patch_embeddings}`, `blocks.N.attention.*`),
          and those files store the fine-tuned weights minus the initial ones (deltas).
hf        transformers' `EomtForUniversalSegmentation` (DINOv2) and
          `EomtDinov3ForUniversalSegmentation` (DINOv3); they normalise images outside the model.

Every conversion only renames, splits or concatenates tensors, so outputs stay equal.
"""

import json
import math
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

from eomt.data.categories import distinct_color
from eomt.modeling.eomt import IMAGENET_MEAN, IMAGENET_STD

OURS, OFFICIAL, HF = "ours", "official", "hf"

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
# Keys that hold no weights of the model: the loss's class weights and fixed rotary tables.
IGNORED_KEYS = ("criterion.empty_weight", "embeddings.mask_token")
IGNORED_PARTS = ("rope_embeddings.",)

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

# timm backbones of the released models: width (and gated MLP for DINOv3) -> name, depth.
DINOV2_BACKBONES = {
    384: ("vit_small_patch14_reg4_dinov2", 12),
    768: ("vit_base_patch14_reg4_dinov2", 12),
    1024: ("vit_large_patch14_reg4_dinov2", 24),
    1536: ("vit_giant_patch14_reg4_dinov2", 40),
}
DINOV3_BACKBONES = {
    (384, False): ("vit_small_patch16_dinov3", 12),
    (384, True): ("vit_small_plus_patch16_dinov3", 12),
    (768, False): ("vit_base_patch16_dinov3", 12),
    (1024, False): ("vit_large_patch16_dinov3", 24),
    (1280, True): ("vit_huge_plus_patch16_dinov3", 32),
}
HEAD_DIM = 64  # of every DINOv2 and DINOv3 ViT up to giant / huge+
# Classes and queries of the released models -> task and dataset layout.
KNOWN_DATASETS = {
    (133, 200): ("panoptic", "coco_panoptic"),
    (80, 200): ("instance", "coco_instance"),
    (150, 200): ("panoptic", "ade20k_panoptic"),
    (150, 100): ("semantic", "ade20k_semantic"),
    (19, 100): ("semantic", "cityscapes_semantic"),
}
COCO_PANOPTIC_THINGS = 80  # the first 80 of the 133 COCO panoptic classes are things


def detect_format(state: dict, source: str = "checkpoint") -> str:
    """'ours', 'official' or 'hf', from the key names."""
    if any(k.startswith("network.") for k in state):
        return OFFICIAL
    if "query.weight" in state and any(k.startswith("layers.") for k in state):
        return HF
    if "queries.weight" in state:
        return OURS
    shown = ", ".join(list(state)[:5])
    raise ValueError(
        f"{source}: not EoMT weights: expected 'queries.weight' (this codebase), "
        f"'network.q.weight' (official release) or 'query.weight' (Hugging Face); "
        f"found keys such as {shown}"
    )


def to_ours(
    state: dict, source: str = "checkpoint", pixel_mean=IMAGENET_MEAN, pixel_std=IMAGENET_STD
) -> dict:
    """Weights in any of the three layouts -> ours (`pixel_mean` / `pixel_std`: the image
    statistics of HF weights, whose image processor normalises)."""
    state = {
        k: v
        for k, v in state.items()
        if k not in IGNORED_KEYS and not any(p in k for p in IGNORED_PARTS)
    }
    fmt = detect_format(state, source)
    if fmt == OFFICIAL:
        return official_to_ours(state)
    if fmt == HF:
        return hf_to_ours(state, pixel_mean, pixel_std)
    return state


# -- official ------------------------------------------------------------------------------------


def official_to_ours(state: dict) -> dict:
    backbone = {
        k[len(OFFICIAL_BACKBONE) :]: v for k, v in state.items() if k.startswith(OFFICIAL_BACKBONE)
    }
    if "patch_embed.patch_embeddings.weight" in backbone:  # transformers' DINOv3ViTModel
        backbone = _hf_backbone_to_timm(backbone, "patch_embed.", "blocks.", "norm.", eva=True)
    out = {"backbone." + k: v for k, v in backbone.items()}
    for key, value in state.items():
        if not key.startswith(OFFICIAL_BACKBONE) and key not in IGNORED_KEYS:
            out[_rename(key, OFFICIAL_HEAD_RENAMES)] = value
    return out


def ours_to_official(state: dict) -> dict:
    backbone = _strip(state, "backbone.")
    if _is_eva(backbone):
        backbone = _timm_backbone_to_hf(backbone, "patch_embed.", "blocks.", "norm.", eva=True)
    out = {OFFICIAL_BACKBONE + k: v for k, v in backbone.items()}
    inverse = [(new, old) for old, new in OFFICIAL_HEAD_RENAMES[:-1]]
    for key, value in state.items():
        if not key.startswith("backbone."):
            renamed = _rename(key, inverse)
            out[renamed if renamed != key else "network." + key] = value
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
    backbone = _strip(state, "backbone.")
    norm = _strip(backbone, "norm.")
    body = {k: v for k, v in backbone.items() if not k.startswith("norm.")}
    if not _is_eva(body) and "blocks.0.ls1.gamma" not in body:
        raise ValueError("the Hugging Face EoMT needs layer scale (ls1/ls2) in every block")
    out = _timm_backbone_to_hf(body, "embeddings.", "layers.", None, eva=_is_eva(body))
    out.update({"layernorm." + k: v for k, v in norm.items()})
    inverse = [(new, old) for old, new in HF_HEAD_RENAMES if not new.startswith("backbone.")]
    for key, value in state.items():
        if key.startswith("backbone.") or key in ("pixel_mean", "pixel_std"):
            continue
        if key.startswith("upscale."):
            key = key.replace(".norm.", ".layernorm2d.")
        out[_rename(key, inverse)] = value
    return out


def hf_config(model, categories: list[dict]) -> dict:
    """config.json of the HF model that holds `ours_to_hf(model.state_dict())`."""
    vit = model.backbone
    height, width = vit.patch_embed.img_size
    if height != width:
        raise ValueError(
            f"the Hugging Face EoMT takes square inputs; this model takes {height}x{width}"
        )
    state = vit.state_dict()
    eva = _is_eva(state)
    block = vit.blocks[0]
    config = {
        "hidden_size": vit.embed_dim,
        "num_hidden_layers": len(vit.blocks),
        "num_attention_heads": block.attn.num_heads,
        "image_size": height,
        "patch_size": vit.patch_embed.patch_size[0],
        "num_register_tokens": state["reg_token"].shape[1] if "reg_token" in state else 0,
        "layer_norm_eps": vit.norm.eps,
        "hidden_act": "gelu",
        "num_blocks": model.num_query_blocks,
        "num_queries": model.num_queries,
        "num_upscale_blocks": len(model.upscale),
        "id2label": {str(i): c["name"] for i, c in enumerate(categories)},
        "label2id": {c["name"]: i for i, c in enumerate(categories)},
    }
    if eva:
        gated = "blocks.0.mlp.fc1_g.weight" in state
        hidden = state["blocks.0.mlp.fc1_g.weight" if gated else "blocks.0.mlp.fc1.weight"].shape[0]
        config.update(
            model_type="eomt_dinov3",
            architectures=["EomtDinov3ForUniversalSegmentation"],
            intermediate_size=hidden,
            use_gated_mlp=gated,
            query_bias="blocks.0.attn.q_bias" in state,
            key_bias=False,
            value_bias="blocks.0.attn.v_bias" in state,
            proj_bias=True,
            mlp_bias=True,
            rope_parameters={"rope_type": "default", "rope_theta": 100.0},
        )
    else:
        fc1_rows = state["blocks.0.mlp.fc1.weight"].shape[0]
        swiglu = _vit_mlp_is_gated(state)
        # HF derives the SwiGLU width from mlp_ratio 4; DINOv2-g's packed fc1 holds both halves.
        if swiglu and 2 * _hf_swiglu_hidden(vit.embed_dim, 4) != fc1_rows:
            raise ValueError("this SwiGLU hidden size has no Hugging Face EoMT equivalent")
        config.update(
            model_type="eomt",
            architectures=["EomtForUniversalSegmentation"],
            use_swiglu_ffn=swiglu,
            mlp_ratio=4 if swiglu else fc1_rows // vit.embed_dim,
        )
    return config


def save_hf(
    model, categories: list[dict], folder: str | Path, no_object_weight: float = 0.1
) -> Path:
    """Write `model` as a transformers model folder: model.safetensors, config.json and the
    image processor's preprocessor_config.json with the model's image statistics."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = ours_to_hf(model.state_dict())
    state["criterion.empty_weight"] = _empty_weight(model.num_classes, no_object_weight)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(hf_config(model, categories), indent=2))
    processor = {
        "image_processor_type": "EomtImageProcessor",
        "do_rescale": True,
        "do_normalize": True,
        "image_mean": model.pixel_mean.flatten().tolist(),
        "image_std": model.pixel_std.flatten().tolist(),
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    return folder / "model.safetensors"


def official_state_dict(model, no_object_weight: float = 0.1) -> dict:
    """`model`'s weights as the official release stores them, with the loss's class weights."""
    state = ours_to_official(model.state_dict())
    state["criterion.empty_weight"] = _empty_weight(model.num_classes, no_object_weight)
    return state


def _empty_weight(num_classes: int, no_object_weight: float) -> torch.Tensor:
    """The class weights of the loss, which both other layouts keep with the model."""
    weight = torch.ones(num_classes + 1)
    weight[-1] = no_object_weight
    return weight


def _hf_swiglu_hidden(dim: int, mlp_ratio: float) -> int:
    return (int(int(dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8


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
    for index, block in _split_blocks(state, blocks).items():
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
    for index, block in _split_blocks(state, "blocks.").items():
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
    """One block: separate q, k, v projections -> timm's fused qkv; gated MLP halves -> timm's."""
    block = dict(block)
    attn = "attention."
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
    gated = _vit_mlp_is_gated(block, prefix="")
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


def _vit_mlp_is_gated(state: dict, prefix: str = "blocks.0.") -> bool:
    """timm ViT's packed SwiGLU: fc1 has twice the rows fc2 has columns."""
    fc1, fc2 = state.get(prefix + "mlp.fc1.weight"), state.get(prefix + "mlp.fc2.weight")
    return fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]


def _is_eva(backbone: dict) -> bool:
    """timm's Eva (DINOv3): layer scale `gamma_1` and rotary positions instead of `pos_embed`."""
    return "blocks.0.gamma_1" in backbone or (
        "pos_embed" not in backbone and "blocks.0.attn.qkv.weight" in backbone
    )


def _split_blocks(state: dict, prefix: str) -> dict[int, dict]:
    blocks: dict[int, dict] = {}
    for key, value in state.items():
        if key.startswith(prefix):
            index, rest = key[len(prefix) :].split(".", 1)
            blocks.setdefault(int(index), {})[rest] = value
    return dict(sorted(blocks.items()))


def _strip(state: dict, prefix: str) -> dict:
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


# -- configs from weights ------------------------------------------------------------------------


def infer_config(
    state: dict, image_size: tuple[int, int] | None = None, num_heads: int | None = None
) -> dict:
    """Flat config values of the EoMT that holds `state` (ours): the timm backbone (name and,
    for sizes no released model has, its width, depth, heads, MLP ratio, registers and layer
    scale), patch and input size, classes, queries, L2, and the task of the known datasets.

    Heads are not in the shapes: DINOv2 and DINOv3 use heads of 64 channels unless
    `num_heads` says otherwise. DINOv3 (rotary positions) keeps no input size: 640 unless given.
    """
    for key in ("queries.weight", "class_head.weight", "backbone.patch_embed.proj.weight"):
        if key not in state:
            raise ValueError(f"cannot infer the model: no '{key}' in the weights")
    backbone = _strip(state, "backbone.")
    dim = backbone["patch_embed.proj.weight"].shape[0]
    patch = backbone["patch_embed.proj.weight"].shape[-1]
    depth = len(_split_blocks(backbone, "blocks."))
    registers = backbone["reg_token"].shape[1] if "reg_token" in backbone else 0
    eva = _is_eva(backbone)
    layer_scale = "blocks.0.gamma_1" in backbone or "blocks.0.ls1.gamma" in backbone
    if eva:
        gated = "blocks.0.mlp.fc1_g.weight" in backbone
        hidden = backbone[
            "blocks.0.mlp.fc1_g.weight" if gated else "blocks.0.mlp.fc1.weight"
        ].shape[0]
        name, standard_depth = DINOV3_BACKBONES.get((dim, gated), (None, None))
        if name is None:
            name = "vit_small_plus_patch16_dinov3" if gated else "vit_small_patch16_dinov3"
        if "blocks.0.attn.q_bias" in backbone:
            name += "_qkvb"
        default_registers, register_key = 4, "num_reg_tokens"
    else:
        gated = _vit_mlp_is_gated(backbone)
        hidden = backbone["blocks.0.mlp.fc1.weight"].shape[0]
        name, standard_depth = DINOV2_BACKBONES.get(dim, (None, None))
        if name is None or gated != (dim == 1536):
            name = "vit_giant_patch14_reg4_dinov2" if gated else "vit_small_patch14_reg4_dinov2"
            standard_depth = None
        default_registers, register_key = 4, "reg_tokens"
    kwargs = {}
    if depth != standard_depth or num_heads not in (None, dim // HEAD_DIM):
        # Not a released size: the family's architecture at this width and depth.
        ratio = hidden / dim
        kwargs.update(embed_dim=dim, depth=depth, num_heads=num_heads or max(1, dim // HEAD_DIM))
        kwargs["mlp_ratio"] = ratio if int(dim * ratio) == hidden else ratio + 1e-9
    if registers != default_registers:
        kwargs[register_key] = registers
    if not layer_scale:
        kwargs["init_values"] = None
    if image_size is None:
        if "pos_embed" in backbone:
            side = math.isqrt(backbone["pos_embed"].shape[1])
            if side * side != backbone["pos_embed"].shape[1]:
                raise ValueError(
                    f"pos_embed holds {backbone['pos_embed'].shape[1]} positions, not a square "
                    "grid: give the input size"
                )
            image_size = (side * patch, side * patch)
        else:
            image_size = (640, 640)
    num_classes = state["class_head.weight"].shape[0] - 1
    num_queries = state["queries.weight"].shape[0]
    task, dataset = KNOWN_DATASETS.get((num_classes, num_queries), ("panoptic", "coco_panoptic"))
    config = {
        "task": task,
        "model.backbone": name,
        "model.backbone_kwargs": kwargs,
        "model.pretrained": False,
        "model.patch_size": patch,
        "model.num_classes": num_classes,
        "model.num_queries": num_queries,
        "input.image_size": list(image_size),
        "dataset.name": dataset,
        "test.metrics": [task],
    }
    if "attn_mask_probs" in state:
        config["model.num_query_blocks"] = state["attn_mask_probs"].shape[0]
    return config


def generic_categories(num_classes: int, names: list[str] | None = None) -> list[dict]:
    """Class metadata for weights that carry none: given names or 'class N', and for the 133
    COCO panoptic classes the first 80 as things (stuff otherwise, things for 80 classes)."""
    things = {133: COCO_PANOPTIC_THINGS, 80: 80}.get(num_classes, 0)
    return [
        {
            "id": i,
            "name": names[i] if names else f"class {i}",
            "isthing": int(i < things),
            "color": distinct_color(i),
        }
        for i in range(num_classes)
    ]
