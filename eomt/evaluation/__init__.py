"""The PQ, mIoU and mask AP evaluators (numpy, pycocotools), and in `postprocess` (torch) the
post-processing of query predictions.

The names below are imported on first use: scoring panoptic files needs no pycocotools.
"""

from importlib import import_module

_LAZY = {
    "InstanceEvaluator": "eomt.evaluation.instance",
    "PanopticEvaluator": "eomt.evaluation.panoptic",
    "SemanticEvaluator": "eomt.evaluation.semantic",
    "masks_to_panoptic": "eomt.evaluation.panoptic",
    "masks_to_semantic": "eomt.evaluation.semantic",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    """A name of `_LAZY`, or a module (`eomt.evaluation.panoptic`, ...)."""
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    try:
        return import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as error:
        if error.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module '{__name__}' has no attribute '{name}'") from None
