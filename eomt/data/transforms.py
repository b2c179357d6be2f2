"""Training augmentation applied jointly to an image and its masks, and batch collation.

Randomness comes from torch's global RNG only, so seeding torch per sample reproduces a sample.
"""

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

BRIGHTNESS_DELTA = 32 / 255
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18 / 360  # as a fraction of the hue circle, the unit of F.adjust_hue
PHOTOMETRIC_PROBABILITY = 0.5


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(()).uniform_(low, high))


def _chance(probability: float) -> bool:
    return bool(torch.rand(()) < probability)


def photometric_jitter(image: torch.Tensor) -> torch.Tensor:
    """Brightness (additive), contrast, saturation and hue jitter, each applied with p=0.5."""
    if _chance(PHOTOMETRIC_PROBABILITY):
        image = (image + _uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA)).clamp(0, 1)
    if _chance(PHOTOMETRIC_PROBABILITY):
        image = F.adjust_contrast(image, _uniform(*CONTRAST_RANGE))
    if _chance(PHOTOMETRIC_PROBABILITY):
        image = F.adjust_saturation(image, _uniform(*SATURATION_RANGE))
    if _chance(PHOTOMETRIC_PROBABILITY):
        image = F.adjust_hue(image, _uniform(-HUE_DELTA, HUE_DELTA))
    return image.clamp(0, 1)


class TrainTransforms:
    """Flip, scale jitter, pad and random crop to crop_size, optional photometric jitter.

    Masks emptied by the crop and crowd instances are dropped from the target; a crop that keeps
    no mask at all is redrawn, up to max_tries times (then the last draw is returned).
    crop_size is (height, width); scale_range is relative to the scale that fits the image in it.
    """

    def __init__(
        self,
        crop_size: tuple[int, int],
        scale_range: tuple[float, float],
        color_jitter: bool,
        max_tries: int = 10,
    ):
        if len(crop_size) != 2 or min(crop_size) < 1:
            raise ValueError(f"crop_size must be (height, width) of positive ints, got {crop_size}")
        if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(
                f"scale_range must be (low, high) with 0 < low <= high, got {scale_range}"
            )
        if max_tries < 1:
            raise ValueError(f"max_tries must be >= 1, got {max_tries}")
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.color_jitter = color_jitter
        self.max_tries = max_tries
        self._flip = v2.RandomHorizontalFlip(p=0.5)
        self._crop = v2.RandomCrop(self.crop_size)

    def __call__(self, image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        for _ in range(self.max_tries):
            out_image, out_target = self._augment_once(image, target)
            if len(out_target["labels"]) > 0:
                break
        return out_image, out_target

    def _augment_once(self, image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        image, masks = self.augment_geometry(image, target["masks"])
        keep = masks.flatten(1).any(dim=1) & ~target["is_crowd"]
        new_target = {
            **target,
            "masks": masks[keep],
            "labels": target["labels"][keep],
            "is_crowd": target["is_crowd"][keep],
        }
        return image, new_target

    def augment_geometry(
        self, image: torch.Tensor, masks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One draw of flip, scale, colour jitter, pad and crop, applied alike to a float image
        (3, H, W) or to several at once (..., 3, H, W), and to masks (M, H, W)."""
        image, masks = self._flip(tv_tensors.Image(image), tv_tensors.Mask(masks))

        height, width = image.shape[-2:]
        crop_height, crop_width = self.crop_size
        scale = min(crop_height / height, crop_width / width) * _uniform(*self.scale_range)
        size = [max(1, round(height * scale)), max(1, round(width * scale))]
        image, masks = F.resize(image, size, antialias=True), F.resize(masks, size)

        if self.color_jitter:
            # Before padding, so that the zero padding stays zero.
            image = tv_tensors.wrap(photometric_jitter(image.as_subclass(torch.Tensor)), like=image)

        padding = [0, 0, max(0, crop_width - size[1]), max(0, crop_height - size[0])]
        image, masks = F.pad(image, padding, fill=0), F.pad(masks, padding, fill=0)
        image, masks = self._crop(image, masks)

        return image.as_subclass(torch.Tensor), masks.as_subclass(torch.Tensor)


def collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Keep images and targets as lists; the trainer stacks images of equal size."""
    images, targets = zip(*batch)
    return list(images), list(targets)
