"""The architecture of the EoMT that holds some weights: its config, inferred from key names
and shapes where the file carries none."""

import math

from omegaconf import DictConfig

from eomt.config import cfg_from_dict, get_cfg
from eomt.data.categories import generic_categories
from eomt.modeling.backbone import default_taps
from eomt.weights.files import StoredWeights
from eomt.weights.layouts import is_eva, is_pmt, split_blocks, strip_prefix, vit_mlp_is_gated

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
# VidEoMT's released models: classes -> task (YouTube-VIS 2019/21/22: 40, OVIS: 25; VIPSeg and
# VSPW, 124 classes both, are panoptic and semantic: read as panoptic).
VIDEO_TASKS = {40: "instance", 25: "instance", 124: "panoptic"}


def model_config(
    state: dict,
    stored: StoredWeights,
    image_size: tuple[int, int] | None = None,
    num_heads: int | None = None,
    video: bool = False,
) -> tuple[DictConfig, list[dict]]:
    """(cfg, categories) of the model whose weights `stored` holds, `state` in our layout.

    Our checkpoints carry both. For official and Hugging Face weights the architecture is
    inferred (`infer_config`); an HF folder's config.json gives the input size, heads and class
    names. `image_size` and `num_heads` override what the file does not say. `video`: the
    weights are VidEoMT's, or EoMT's to initialise VidEoMT with (`as_videomt`)."""
    if stored.cfg is not None:
        cfg = cfg_from_dict(stored.cfg)
        if image_size is not None:
            cfg.input.image_size = list(image_size)
        if video:
            as_videomt(cfg, stored.path)
        categories = stored.categories
    else:
        hf = stored.hf_config
        if image_size is None and "image_size" in hf:
            side = hf["image_size"]
            image_size = tuple(side) if isinstance(side, list) else (side, side)
        num_heads = num_heads or hf.get("num_attention_heads")
        cfg = get_cfg(overrides=infer_config(state, image_size, num_heads, video))
        id2label = hf.get("id2label")
        names = [id2label[str(i)] for i in range(len(id2label))] if id2label else None
        categories = generic_categories(cfg.model.num_classes, names)
    return cfg, categories or generic_categories(cfg.model.num_classes)


def as_videomt(cfg: DictConfig, source="weights") -> DictConfig:
    """The config of an EoMT made VidEoMT (the same weights and a new query updater)."""
    if cfg.model.name not in ("eomt", "videomt"):
        raise ValueError(
            f"{source}: {cfg.model.name} weights; only EoMT's initialise VidEoMT (the same "
            "ViT, queries and heads, and a new query updater)"
        )
    cfg.model.name = "videomt"
    cfg.model.masked_attn = "never"
    return cfg


def infer_config(
    state: dict,
    image_size: tuple[int, int] | None = None,
    num_heads: int | None = None,
    video: bool = False,
) -> dict:
    """Flat config values of the EoMT that holds `state` (ours): the timm backbone (name and,
    for sizes no released model has, its width, depth, heads, MLP ratio, registers and layer
    scale), patch and input size, classes, queries, L2, and the task of the known datasets.

    Heads are not in the shapes: DINOv2 and DINOv3 use heads of 64 channels unless
    `num_heads` says otherwise. DINOv3 (rotary positions) keeps no input size: 640 unless given.

    VidEoMT (weights with a query updater, or any EoMT weights with `video`): its query blocks
    are the last `attn_mask_probs` blocks (the authors' SEGMENTER_BLOCKS, the last ones in all
    their configs) and `videomt.norm_queries` is what the authors' configs set (on for DINOv3
    with 124 classes, VIPSeg and VSPW; off elsewhere), which the weights do not say.
    """
    for key in ("queries.weight", "class_head.weight", "backbone.patch_embed.proj.weight"):
        if key not in state:
            raise ValueError(f"cannot infer the model: no '{key}' in the weights")
    backbone = strip_prefix(state, "backbone.")
    dim = backbone["patch_embed.proj.weight"].shape[0]
    patch = backbone["patch_embed.proj.weight"].shape[-1]
    depth = len(split_blocks(backbone, "blocks."))
    registers = backbone["reg_token"].shape[1] if "reg_token" in backbone else 0
    eva = is_eva(backbone)
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
        gated = vit_mlp_is_gated(backbone)
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
    if is_pmt(state):
        config.update(pmt_config(state, depth))
    elif "attn_mask_probs" in state:
        config["model.num_query_blocks"] = state["attn_mask_probs"].shape[0]
    if video or "query_updater.weight" in state:
        if is_pmt(state):
            raise ValueError("PMT weights cannot make a VidEoMT: only EoMT's")
        task = VIDEO_TASKS.get(num_classes, task)
        config.update(
            {
                "model.name": "videomt",
                "model.masked_attn": "never",
                "task": task,
                "test.metrics": [task],
                "videomt.norm_queries": eva and num_classes == 124,
            }
        )
    return config


def pmt_config(state: dict, depth: int) -> dict:
    """PMT's keys: its new blocks, their MLP width and the taps, on a frozen encoder. The taps'
    indices are not in the weights: 4 taps are read as the authors' (4 evenly spaced blocks, the
    last included, as every one of their configs)."""
    num_taps = len(split_blocks(state, "tap_norms."))
    taps = default_taps(depth)
    if num_taps != len(taps):
        raise ValueError(
            f"PMT weights with {num_taps} taps on a {depth}-block encoder: which blocks they "
            "tap is not in the weights (4 taps are read as the authors' evenly spaced ones)"
        )
    return {
        "model.name": "pmt",
        "model.frozen_blocks": -1,
        "pmt.num_blocks": len(split_blocks(state, "blocks.")),
        "pmt.mlp_dim": state["blocks.0.mlp.fc1.weight"].shape[0],
        "pmt.taps": taps,
    }
