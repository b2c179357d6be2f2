"""EoMT: the Encoder-only Mask Transformer, a plain ViT that segments images."""

from eomt.config import get_cfg
from eomt.modeling import EoMT, build_model
from eomt.predictor import Predictor
from eomt.weights import from_checkpoint, load_checkpoint

__all__ = ["EoMT", "Predictor", "build_model", "from_checkpoint", "get_cfg", "load_checkpoint"]
