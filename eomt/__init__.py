"""EoMT: the Encoder-only Mask Transformer, a plain ViT that segments images.

The names below are imported on first use, so that `import eomt.evaluation` and the tools that
score files need neither torch nor timm.
"""

from eomt.lazy import lazy_getattr

_LAZY = {
    "get_cfg": "eomt.config",
    "EoMT": "eomt.modeling",
    "build_model": "eomt.modeling",
    "Predictor": "eomt.deploy.predictor",
    "from_checkpoint": "eomt.weights",
    "load_checkpoint": "eomt.weights",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY)
