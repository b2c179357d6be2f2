"""The PQ, mIoU and mask AP evaluators (numpy, pycocotools), and in `postprocess` (torch) the
post-processing of query predictions.

The names below are imported on first use: scoring panoptic files needs no pycocotools.
"""

from eomt.lazy import lazy_getattr

_LAZY = {
    "InstanceEvaluator": "eomt.evaluation.instance",
    "PanopticEvaluator": "eomt.evaluation.panoptic",
    "SemanticEvaluator": "eomt.evaluation.semantic",
    "masks_to_panoptic": "eomt.evaluation.panoptic",
    "masks_to_semantic": "eomt.evaluation.semantic",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY)
