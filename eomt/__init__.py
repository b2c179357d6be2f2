"""EoMT: the Encoder-only Mask Transformer, a plain ViT that segments images."""

from eomt.config import get_cfg
from eomt.engine.checkpoint import load_checkpoint
from eomt.modeling import EoMT, build_model
from eomt.predictor import Predictor

__all__ = ["EoMT", "Predictor", "build_model", "get_cfg", "load_checkpoint"]
