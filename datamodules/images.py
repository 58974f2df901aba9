"""Finding and reading image files into RGB, and turning RGB images into the tensors a VAE encodes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2

# The endings (lower case) that mark a file as an image, in folders of images and in file names.
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
# Pillow's modes for 16-bit grayscale, plus "I" (32-bit), which older Pillow versions used
# for 16-bit PNGs: all are read as the 16-bit range 0..65535.
HIGH_BIT_DEPTH_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


class ImageLoadError(ValueError):
    """An image file that cannot be decoded: corrupt, truncated or not an image at all."""


def existing_names(folder: Path) -> set[str]:
    """The names of the entries of `folder` (none if it does not exist): one listing instead of a
    stat per image, which matters for tens of thousands of images on a network file system."""
    return set(os.listdir(folder)) if folder.is_dir() else set()


def load_image(path: str | os.PathLike, draft_size: int | None = None) -> Image.Image:
    """Read an image file as RGB.

    draft_size: the side the image will be resized to. A JPEG is then decoded directly at a
        reduced scale (1/2, 1/4 or 1/8) that keeps both sides >= draft_size, which is much
        cheaper than decoding a large radiograph in full and shrinking it afterwards.
    """
    try:
        with Image.open(path) as img:
            if draft_size is not None and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            # Decoding is lazy: load() here makes a truncated file fail inside this try.
            img.load()
            # Phone photos (e.g. dermatology) are often stored sideways with an EXIF rotation.
            return to_rgb(ImageOps.exif_transpose(img))
    except FileNotFoundError:
        raise  # a missing file is not a decoding problem; keep the more precise error
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageLoadError(f"cannot read image {path}: {err}") from err


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow image as 8-bit RGB; grayscale becomes three identical channels."""
    if img.mode in HIGH_BIT_DEPTH_MODES:
        # Pillow's own conversion clips 16-bit values at 255 (almost all white); scale instead,
        # so that 65535 -> 255. Data with fewer significant bits (12-bit CT stored in 16) comes
        # out dark: window it when exporting the images.
        values = np.clip(np.asarray(img, dtype=np.float64), 0, 65535)
        img = Image.fromarray(np.round(values / 257).astype(np.uint8))
    return img if img.mode == "RGB" else img.convert("RGB")


class ImageTransform:
    """RGB image -> float tensor [3, size, size] in [-1, 1], the range Stable Diffusion's VAE expects.

    The shorter side is resized to `size` (bicubic, antialiased), then a centre crop (or a random
    one, as augmentation) makes it square. With `pad_to_square`, the longer side is resized to
    `size` instead and black borders make it square, so nothing at the edges is cut off (endoscopy
    frames, wide CT slices; MSDM pads). Horizontal flips are off by default: flipping a chest X-ray
    moves left-sided findings to the right (and the heart with them), contradicting its caption.
    """

    def __init__(
        self, size: int, center_crop: bool = True, random_flip: bool = False, pad_to_square: bool = False
    ):
        self.size = size
        self.deterministic = (center_crop or pad_to_square) and not random_flip
        bicubic = v2.InterpolationMode.BICUBIC
        if pad_to_square:
            # CenterCrop pads with zeros (black) where the image is smaller than the crop.
            fit = [v2.Resize(None, max_size=size, interpolation=bicubic, antialias=True), v2.CenterCrop(size)]
        else:
            fit = [
                v2.Resize(size, interpolation=bicubic, antialias=True),
                v2.CenterCrop(size) if center_crop else v2.RandomCrop(size),
            ]
        steps = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), *fit]
        if random_flip:
            steps.append(v2.RandomHorizontalFlip())
        self.steps = v2.Compose(steps)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        # Bicubic interpolation overshoots slightly around sharp edges: clamp back into [0, 1].
        return self.steps(img).clamp_(0, 1).mul_(2).sub_(1)
