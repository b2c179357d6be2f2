from eomt.modeling.backbone import build_vit, embed_tokens
from eomt.modeling.eomt import EoMT


def build_model(cfg, backbone_weights: bool = True) -> EoMT:
    """The EoMT model a config describes, with the backbone's pretrained weights if asked
    (`backbone_weights=False` skips them, when a full checkpoint is loaded next)."""
    m = cfg.model
    if m.name != "eomt":
        raise ValueError(f"model.name '{m.name}' is not one of ['eomt']")
    backbone = build_vit(
        m.backbone,
        img_size=tuple(cfg.input.image_size),
        patch_size=m.patch_size,
        pretrained=m.pretrained and backbone_weights,
        weights=m.backbone_weights if backbone_weights else "",
        **m.backbone_kwargs,
    )
    return EoMT(
        backbone,
        num_classes=m.num_classes,
        num_queries=m.num_queries,
        num_query_blocks=m.num_query_blocks,
        masked_attn=m.masked_attn,
    )


__all__ = ["EoMT", "build_model", "build_vit", "embed_tokens"]
