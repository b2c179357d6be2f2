from torch import nn

from eomt.modeling.backbone import (
    build_vit,
    default_taps,
    embed_tokens,
    freeze_blocks,
    tap_blocks,
)
from eomt.modeling.criterion import MaskClassificationLoss
from eomt.modeling.dense_heads import DENSE_HEADS, DenseSegmenter, PixelCrossEntropy
from eomt.modeling.eomt import EoMT
from eomt.modeling.mask2former import Mask2Former
from eomt.modeling.pmt import PMT
from eomt.modeling.token_merging import TokenMerging
from eomt.modeling.videomt import VidEoMT

MODEL_NAMES = ("eomt", "m2f", "pmt", "dense", "videomt")


def build_model(cfg, backbone_weights: bool = True) -> nn.Module:
    """The model a config describes (`model.name`: "eomt"; "m2f" for Mask2Former and the
    ladder between it and EoMT, set by the `m2f` keys; "pmt" for PMT, new blocks on a frozen
    encoder's taps, set by the `pmt` keys; "dense" for a per-pixel head, set by the `dense`
    keys; "videomt" for VidEoMT, EoMT on video, set by the `videomt` keys), with the
    backbone's pretrained weights if asked (`backbone_weights=False` skips them, when a full
    checkpoint is loaded next) and its first `model.frozen_blocks` blocks frozen."""
    return _build(cfg, backbone_weights)


def build_backbone(cfg, pretrained: bool = True) -> nn.Module:
    """The config's timm ViT, with its pretrained weights (`model.backbone_weights` or, with
    `model.pretrained`, the hub's) if `pretrained`."""
    m = cfg.model
    return build_vit(
        m.backbone,
        img_size=tuple(cfg.input.image_size),
        patch_size=m.patch_size,
        pretrained=m.pretrained and pretrained,
        weights=m.backbone_weights if pretrained else "",
        **m.backbone_kwargs,
    )


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters()) - trainable


def _build(cfg, backbone_weights: bool) -> nn.Module:
    m = cfg.model
    if m.num_classes < 1:
        raise ValueError(
            "model.num_classes is 0, which stands for the dataset's number of classes: set it, "
            "or build the model through eomt.engine.trainer.Trainer, which reads the dataset"
        )
    if m.name not in MODEL_NAMES:
        raise ValueError(f"model.name '{m.name}' is not one of {list(MODEL_NAMES)}")
    if m.name == "m2f" and m.masked_attn == "anneal":
        raise ValueError(
            "model.masked_attn 'anneal' is not available with model.name 'm2f': "
            "set 'always' (Mask2Former) or 'never'"
        )
    merging = m.token_merging
    if merging.enabled and m.name != "eomt":
        raise ValueError(
            f"model.token_merging is available with model.name 'eomt' only, not '{m.name}'"
        )
    if merging.enabled and cfg.solver.compile:
        raise ValueError(
            "model.token_merging gives each image its own number of tokens, which "
            "solver.compile would recompile for: set solver.compile=false"
        )
    if m.name == "dense" and (cfg.task != "semantic" or list(cfg.test.metrics) != ["semantic"]):
        raise ValueError(
            "model.name 'dense' predicts a class per pixel: it needs task semantic and "
            f"test.metrics [semantic] (got task {cfg.task}, test.metrics {list(cfg.test.metrics)})"
        )
    backbone = build_backbone(cfg, backbone_weights)
    # Before the model is built: PMT and the dense heads then freeze the blocks they never run.
    freeze_blocks(backbone, m.frozen_blocks)
    if m.name == "m2f":
        c = cfg.m2f
        return Mask2Former(
            backbone,
            num_classes=m.num_classes,
            num_queries=m.num_queries,
            adapter=c.adapter,
            pixel_decoder=c.pixel_decoder,
            multi_scale=c.multi_scale,
            masked_attn=m.masked_attn,
            hidden_dim=c.hidden_dim,
            num_heads=c.num_heads,
            dec_layers=c.dec_layers,
            dim_feedforward=c.dim_feedforward,
            enc_layers=c.enc_layers,
            enc_dim_feedforward=c.enc_dim_feedforward,
            deform_points=c.deform_points,
            adapter_deform_ratio=c.adapter_deform_ratio,
            adapter_interaction_indexes=[list(g) for g in c.adapter_interaction_indexes] or None,
        )
    if m.name == "dense":
        d = cfg.dense
        return DenseSegmenter(
            backbone,
            num_classes=m.num_classes,
            head=d.head,
            taps=list(d.taps) or None,
            channels=d.channels or None,
            stem=d.stem,
        )
    if m.name == "pmt":
        p = cfg.pmt
        return PMT(
            backbone,
            num_classes=m.num_classes,
            num_queries=m.num_queries,
            num_blocks=p.num_blocks,
            taps=list(p.taps) or None,
            mlp_dim=p.mlp_dim or None,
            masked_attn=m.masked_attn,
        )
    if m.name == "videomt":
        if m.masked_attn != "never":
            raise ValueError(
                "model.name 'videomt' has no masked attention (as the authors' model): "
                f"set model.masked_attn never (got {m.masked_attn!r})"
            )
        return VidEoMT(
            backbone,
            num_classes=m.num_classes,
            num_queries=m.num_queries,
            num_query_blocks=m.num_query_blocks,
            norm_queries=cfg.videomt.norm_queries,
        )
    return EoMT(
        backbone,
        num_classes=m.num_classes,
        num_queries=m.num_queries,
        num_query_blocks=m.num_query_blocks,
        masked_attn=m.masked_attn,
        token_merging=build_token_merging(cfg) if merging.enabled else None,
    )


def build_token_merging(cfg) -> TokenMerging:
    """The config's ALGM token merging (`model.token_merging`, whatever its `enabled`)."""
    t = cfg.model.token_merging
    return TokenMerging(
        window=t.window,
        threshold=t.threshold,
        local_block=t.local_block,
        global_block=t.global_block,
        prop_attn=t.prop_attn,
        restore=t.restore,
        batch_count=t.batch_count,
    )


def build_criterion(cfg) -> nn.Module:
    """The loss a config describes (`loss.*`), for `model.num_classes` classes: per-pixel cross
    entropy for a dense head, else the mask-classification loss with Hungarian matching."""
    if cfg.model.name == "dense":
        return PixelCrossEntropy(cfg.model.num_classes)
    loss = cfg.loss
    return MaskClassificationLoss(
        num_classes=cfg.model.num_classes,
        class_weight=loss.class_weight,
        mask_weight=loss.mask_weight,
        dice_weight=loss.dice_weight,
        no_object_weight=loss.no_object_weight,
        num_points=loss.num_points,
        oversample_ratio=loss.oversample_ratio,
        importance_sample_ratio=loss.importance_sample_ratio,
        video_matching=loss.video_matching,
    )


__all__ = [
    "DENSE_HEADS",
    "DenseSegmenter",
    "EoMT",
    "Mask2Former",
    "PMT",
    "PixelCrossEntropy",
    "TokenMerging",
    "VidEoMT",
    "build_backbone",
    "build_criterion",
    "build_model",
    "build_token_merging",
    "build_vit",
    "count_trainable",
    "default_taps",
    "embed_tokens",
    "freeze_blocks",
    "tap_blocks",
]
