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
# Modes whose values are not intensities (palette indices, single bits): not to be averaged.
INDEXED_MODES = {"P", "PA", "1"}
# The largest image, in pixels (width x height), that load_image decodes; set_max_image_pixels
# changes it. By default Pillow's own limit, past which it refuses a file as a possible
# decompression bomb: a PNG of a few hundred kilobytes can hold an image that takes gigabytes.
max_image_pixels: int | None = None if Image.MAX_IMAGE_PIXELS is None else 2 * Image.MAX_IMAGE_PIXELS


class ImageLoadError(ValueError):
    """An image file that cannot be decoded: corrupt, truncated or not an image at all."""


def existing_names(folder: Path) -> set[str]:
    """The names of the entries of `folder` (none if it does not exist): one listing instead of a
    stat per image, which matters for tens of thousands of images on a network file system."""
    return set(os.listdir(folder)) if folder.is_dir() else set()


def set_max_image_pixels(limit: int | None) -> None:
    """Sets the largest image (width x height, in pixels) load_image decodes; None: any size.

    Pillow refuses images of more than twice its own Image.MAX_IMAGE_PIXELS while opening them,
    before this limit is looked at: a limit above that raises Pillow's with it (never lowers it).
    """
    global max_image_pixels
    max_image_pixels = limit
    pillow = Image.MAX_IMAGE_PIXELS
    if pillow is not None and (limit is None or limit > 2 * pillow):
        Image.MAX_IMAGE_PIXELS = limit


def load_image(path: str | os.PathLike, draft_size: int | None = None) -> Image.Image:
    """Read an image file as RGB.

    draft_size: the side the image will be resized to. A JPEG is then decoded directly at a
        reduced scale (1/2, 1/4 or 1/8) that keeps both sides >= draft_size, which is much
        cheaper than decoding a large radiograph in full and shrinking it afterwards. Any other
        image is shrunk to about twice draft_size before its conversion to RGB (see `reduced`).
    An image of more than max_image_pixels pixels is refused before it is decoded.
    """
    try:
        with Image.open(path) as img:
            _check_size(img, path)
            if draft_size is not None and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            # Decoding is lazy: load() here makes a truncated file fail inside this try.
            img.load()
            # Phone photos (e.g. dermatology) are often stored sideways with an EXIF rotation.
            # In place: an image without one is not copied.
            ImageOps.exif_transpose(img, in_place=True)
            return to_rgb(reduced(img, draft_size))
    except (FileNotFoundError, ImageLoadError):
        raise  # a missing file is not a decoding problem; keep the more precise error
    except Image.DecompressionBombError as err:  # Pillow's own check, made while opening
        raise ImageLoadError(f"cannot read image {path}: {err} {_RAISE_THE_LIMIT}") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageLoadError(f"cannot read image {path}: {err}") from err


_RAISE_THE_LIMIT = (
    "(a guard against decompression bombs); if the image is genuine, raise the limit with "
    "datamodules.images.set_max_image_pixels"
)


def _check_size(img: Image.Image, path: str | os.PathLike) -> None:
    pixels = img.width * img.height
    if max_image_pixels is not None and pixels > max_image_pixels:
        raise ImageLoadError(
            f"cannot read image {path}: {img.width} x {img.height} = {pixels:,} pixels is more than "
            f"max_image_pixels, {max_image_pixels:,} {_RAISE_THE_LIMIT}"
        )


def reduced(img: Image.Image, draft_size: int | None) -> Image.Image:
    """`img` shrunk by a whole factor, averaging boxes of pixels in its own mode and bit depth, to
    no less than twice draft_size on its shorter side; unchanged when that is no reduction.

    The transform's antialiased resize to draft_size then sees the same detail, and the per-pixel
    conversion to RGB a small image: what PNG and TIFF lack of JPEG's draft mode. A palette or
    1-bit image is converted to RGB first, since its values cannot be averaged.
    """
    factor = 0 if draft_size is None else min(img.size) // (2 * draft_size)
    if factor < 2:
        return img
    if img.mode in INDEXED_MODES:
        img = img.convert("RGB")
    # Resize's box filter, not reduce(): Pillow's reduce has no 16-bit modes.
    return img.resize((img.width // factor, img.height // factor), Image.Resampling.BOX)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow image as 8-bit RGB; grayscale becomes three identical channels."""
    if img.mode in HIGH_BIT_DEPTH_MODES:
        # Pillow's own conversion clips 16-bit values at 255 (almost all white); scale instead,
        # so that 65535 -> 255. Data with fewer significant bits (12-bit CT stored in 16) comes
        # out dark: window it when exporting the images.
        img = Image.fromarray(_sixteen_to_eight_bits(np.asarray(img)))
    return img if img.mode == "RGB" else img.convert("RGB")


def _sixteen_to_eight_bits(values: np.ndarray) -> np.ndarray:
    """16-bit values (others clipped to 0..65535) divided by 257 and rounded, as uint8, in integers:
    4 bytes a pixel at the most (float64 took 8 per array, and there were four)."""
    # A quotient v / 257 is never halfway (257 is odd), so adding 128 before the floor division rounds.
    wide = np.clip(values, 0, 65535).astype(np.uint32)
    wide += 128
    wide //= 257
    return wide.astype(np.uint8)


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
