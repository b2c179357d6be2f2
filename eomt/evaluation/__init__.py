"""The PQ, mIoU and mask AP evaluators (numpy, pycocotools), and in `postprocess` (torch) the
post-processing of query predictions."""

from eomt.evaluation.instance import InstanceEvaluator
from eomt.evaluation.panoptic import PanopticEvaluator, masks_to_panoptic
from eomt.evaluation.semantic import SemanticEvaluator, masks_to_semantic

__all__ = [
    "InstanceEvaluator",
    "PanopticEvaluator",
    "SemanticEvaluator",
    "masks_to_panoptic",
    "masks_to_semantic",
]
