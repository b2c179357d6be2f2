"""Post-processing of query predictions and the PQ, mIoU and mask AP evaluators."""

from eomt.evaluation.instance import InstanceEvaluator
from eomt.evaluation.panoptic import PanopticEvaluator, masks_to_panoptic
from eomt.evaluation.postprocess import instance_inference, panoptic_inference, semantic_inference
from eomt.evaluation.semantic import SemanticEvaluator, masks_to_semantic

__all__ = [
    "InstanceEvaluator",
    "PanopticEvaluator",
    "SemanticEvaluator",
    "instance_inference",
    "masks_to_panoptic",
    "masks_to_semantic",
    "panoptic_inference",
    "semantic_inference",
]
