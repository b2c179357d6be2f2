from torch import nn

from eomt.modeling.backbone import build_vit, default_taps, embed_tokens, freeze_blocks
from eomt.modeling.criterion import MaskClassificationLoss
from eomt.modeling.dense_heads import DENSE_HEADS, DenseSegmenter, PixelCrossEntropy
from eomt.modeling.eomt import EoMT
from eomt.modeling.mask2former import Mask2Former

MODEL_NAMES = ("eomt", "m2f", "pmt", "dense")


def build_model(cfg, backbone_weights: bool = True) -> nn.Module:
    """The model a config describes (`model.name`: "eomt"; "m2f" for Mask2Former and the
    ladder between it and EoMT, set by the `m2f` keys; "pmt" for EoMT's decoder on a frozen
    encoder, set by the `pmt` keys; "dense" for a per-pixel head, set by the `dense` keys),
    with the backbone's pretrained weights if asked (`backbone_weights=False` skips them, when
    a full checkpoint is loaded next) and its first `model.frozen_blocks` blocks frozen."""
    model = _build(cfg, backbone_weights)
    freeze_blocks(model.backbone, cfg.model.frozen_blocks)
    return model


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
    if m.name == "dense" and (cfg.task != "semantic" or list(cfg.test.metrics) != ["semantic"]):
        raise ValueError(
            "model.name 'dense' predicts a class per pixel: it needs task semantic and "
            f"test.metrics [semantic] (got task {cfg.task}, test.metrics {list(cfg.test.metrics)})"
        )
    backbone = build_vit(
        m.backbone,
        img_size=tuple(cfg.input.image_size),
        patch_size=m.patch_size,
        pretrained=m.pretrained and backbone_weights,
        weights=m.backbone_weights if backbone_weights else "",
        **m.backbone_kwargs,
    )
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
    pmt = m.name == "pmt"
    return EoMT(
        backbone,
        num_classes=m.num_classes,
        num_queries=m.num_queries,
        num_query_blocks=m.num_query_blocks,
        masked_attn=m.masked_attn,
        taps=(list(cfg.pmt.taps) or default_taps(len(backbone.blocks))) if pmt else None,
        decoder_mlp_dim=(cfg.pmt.mlp_dim or None) if pmt else None,
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
    )


__all__ = [
    "DENSE_HEADS",
    "DenseSegmenter",
    "EoMT",
    "Mask2Former",
    "PixelCrossEntropy",
    "build_criterion",
    "build_model",
    "build_vit",
    "count_trainable",
    "default_taps",
    "embed_tokens",
    "freeze_blocks",
]
