"""Segment single images with a trained model."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from eomt.config import cfg_from_dict
from eomt.data import load_image
from eomt.engine.checkpoint import load_checkpoint, read_checkpoint
from eomt.engine.inference import infer
from eomt.modeling import build_model


def as_image_tensor(image) -> torch.Tensor:
    """A path, PIL image, uint8 array (H, W, 3) or float tensor (3, H, W) -> float (3, H, W)."""
    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 array (H, W, 3), got {image.dtype} {image.shape}")
        return TF.to_dtype(torch.from_numpy(image).permute(2, 0, 1), torch.float32, scale=True)
    if isinstance(image, torch.Tensor) and image.dim() == 3 and image.shape[0] == 3:
        return image.float()
    raise TypeError(f"cannot read an image from {type(image).__name__}")


class Predictor:
    """`predictor(image, task)` -> the task's result for one image at its own size.

    panoptic: (segment map (H, W) int32, 0 = void; segments [{id, category_id, isthing, score}]);
    semantic: label map (H, W); instance: {masks (M, H, W), scores (M,), labels (M,)}.
    Labels index `predictor.categories`.
    """

    def __init__(self, model, cfg, categories: list[dict], device=None):
        self.cfg, self.categories = cfg, categories
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = model.to(device).eval()

    @classmethod
    def from_checkpoint(cls, path, device=None) -> "Predictor":
        """A checkpoint written by the trainer carries its config and class names."""
        checkpoint = read_checkpoint(path)
        if "cfg" not in checkpoint or "categories" not in checkpoint:
            raise ValueError(f"{path}: not a training checkpoint of this codebase (no cfg)")
        cfg = cfg_from_dict(checkpoint["cfg"])
        model = build_model(cfg, backbone_weights=False)
        load_checkpoint(model, path)
        return cls(model, cfg, checkpoint["categories"], device)

    def __call__(self, image, task: str | None = None):
        task = task or self.cfg.task
        return infer(self.model, [as_image_tensor(image)], self.cfg, self.categories, [task])[0][
            task
        ]
