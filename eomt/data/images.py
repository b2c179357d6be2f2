"""Reading image files: any mode as 8-bit RGB, EXIF orientation, errors naming the file.

Grayscale, palette, bilevel and CMYK images are converted to RGB and alpha is dropped. 16-bit
(and 32-bit integer) images are scaled to 8 bits: v * 255 / 65535, rounded (values outside
0..65535 clipped); 16-bit RGB PNGs are read by Pillow as their high bytes. Floating-point
images are refused. EXIF orientation: see `load_image`.
"""

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2 import functional as F

from eomt.data.bad_samples import BadSampleError, MissingSampleFileError
from eomt.data.files import DataPath, resolve_path

# File name endings of the images a folder is searched for (compared in lower case).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def open_image_file(
    path: "str | Path | DataPath", what: str = "Image file", load: bool = True
) -> Image.Image:
    """Open (and with `load`, decode) an image from a folder or an archive.

    A missing file raises MissingSampleFileError, an unreadable, corrupt or truncated one
    BadSampleError; both name `what` and the path.
    """
    path = resolve_path(path)
    if not path.is_file():
        raise MissingSampleFileError(f"{what} not found: {path}", path)
    data = path.read_bytes()
    try:
        image = Image.open(io.BytesIO(data))
        if load:
            image.load()
    except Exception as error:  # decoders raise many types; all mean "cannot read this file"
        raise BadSampleError(
            f"{path}: {what.lower()} is corrupt, truncated or not an image "
            f"({type(error).__name__}: {error})",
            path,
        ) from error
    return image


def rgb_pixels(image: Image.Image, where: str) -> np.ndarray:
    """The uint8 (H, W, 3) RGB pixels of a PIL image of any mode (see the module docstring)."""
    mode = image.mode
    if mode == "I" or mode.startswith("I;16"):
        values = np.clip(np.asarray(image).astype(np.float64), 0, 65535)
        gray = np.rint(values * (255 / 65535)).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode == "F":
        raise BadSampleError(f"{where}: floating-point images (mode F) are not supported", where)
    try:
        if mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")  # as Pillow advises for palette transparency
        return np.array(image.convert("RGB"))
    except (ValueError, OSError) as error:
        raise BadSampleError(
            f"{where}: cannot convert mode {mode} to RGB ({error})", where
        ) from error


def _size_text(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def load_image(
    path: "str | Path | DataPath",
    size: tuple[int, int] | None = None,
    annotation: str = "the annotation",
) -> torch.Tensor:
    """Read an image as a float32 RGB tensor (3, H, W) in [0, 1] (see `load_image_uint8`)."""
    return F.to_dtype(load_image_uint8(path, size, annotation), torch.float32, scale=True)


def load_image_uint8(
    path: "str | Path | DataPath",
    size: tuple[int, int] | None = None,
    annotation: str = "the annotation",
) -> torch.Tensor:
    """Read an image as a uint8 RGB tensor (3, H, W).

    Without `size`, EXIF orientation is applied. With `size`, the (height, width) of the
    annotation drawn on this image (`annotation` names it in errors), the annotation defines the
    geometry: the oriented pixels are used if they have that size, else the stored pixels if
    they do (annotations drawn on the stored pixels), else BadSampleError gives both sizes.
    """
    path = resolve_path(path)
    with open_image_file(path) as image:
        try:
            oriented = ImageOps.exif_transpose(image)
        except Exception as error:  # a corrupt EXIF block
            raise BadSampleError(
                f"{path}: cannot apply its EXIF orientation ({type(error).__name__}: {error})",
                path,
            ) from error
        chosen = oriented
        if size is not None and (oriented.height, oriented.width) != tuple(size):
            if (image.height, image.width) != tuple(size):
                stored = (image.height, image.width)
                turned = (oriented.height, oriented.width)
                raise BadSampleError(
                    f"{annotation}: size {_size_text(size)} (height x width) differs from its "
                    f"image {path}, which is {_size_text(stored)}"
                    + (
                        f" ({_size_text(turned)} with its EXIF orientation)"
                        if turned != stored
                        else ""
                    ),
                    path,
                )
            chosen = image
        pixels = rgb_pixels(chosen, str(path))
    return F.to_image(pixels)
