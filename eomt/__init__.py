"""EoMT: the Encoder-only Mask Transformer, a plain ViT that segments images.

The names below are imported on first use, so that `import eomt.evaluation` and the tools that
score files need neither torch nor timm.
"""

from importlib import import_module

_LAZY = {
    "get_cfg": "eomt.config",
    "EoMT": "eomt.modeling",
    "build_model": "eomt.modeling",
    "Predictor": "eomt.predictor",
    "from_checkpoint": "eomt.weights",
    "load_checkpoint": "eomt.weights",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    """A name of `_LAZY`, or a subpackage or module (`eomt.weights`, `eomt.predictor`, ...)."""
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    try:
        return import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as error:
        if error.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module 'eomt' has no attribute '{name}'") from None
