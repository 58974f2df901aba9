"""What the phantom writers share: atomic output folders, reproducible files and drawing helpers.

Reproducible means byte-identical for the same seed: JPEGs at a fixed quality, and gzip headers
without a timestamp (gzip stores the write time by default, which changes the bytes each run).
The drawing helpers work on coordinate grids in units of the image width, so an image drawn at
64 px and at 2500 px shows the same anatomy, with edges that stay soft at any resolution.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ..atomic import atomic_directory

JPEG_QUALITY = 90
ALNUM = np.array(list("abcdefghijklmnopqrstuvwxyz0123456789"))


@contextmanager
def atomic_output(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a scratch folder that becomes `out` when the block succeeds (datamodules.atomic), so
    readers see either no dataset or a complete one. `out` must not exist or be an empty folder:
    phantoms never replace someone's data."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; phantoms go to a new folder")
    with atomic_directory(out) as scratch:
        yield scratch


def save_jpeg(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "JPEG", quality=JPEG_QUALITY)


def write_csv(df: pd.DataFrame, path: Path, sep: str = ",") -> None:
    """Write without the index; a `.gz` path is gzipped with a zero timestamp (reproducible bytes)."""
    compression = {"method": "gzip", "mtime": 0} if path.suffix == ".gz" else None
    df.to_csv(path, sep=sep, index=False, compression=compression, lineterminator="\n")


def split_counts(n: int) -> tuple[int, int, int]:
    """Sizes of an 80/10/10 train/validation/test split of n items (the test part takes the rest)."""
    n_train, n_val = round(0.8 * n), round(0.1 * n)
    return n_train, n_val, n - n_train - n_val


def random_id(rng: np.random.Generator, length: int, first: str = "") -> str:
    """`first` followed by random lowercase letters and digits, `length` characters in all."""
    return first + "".join(rng.choice(ALNUM, size=length - len(first)))


def grid(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in units of the width: x in (0, 1) across, shape (1, W); y of
    shape (H, 1), with the image's vertical middle at 0.5 whatever the aspect ratio."""
    x = (np.arange(width, dtype=np.float32) + 0.5) / width
    y = (np.arange(height, dtype=np.float32) + 0.5 - (height - width) / 2) / width
    return x[None, :], y[:, None]


def soft(d: np.ndarray | float, edge: float) -> np.ndarray:
    """A mask from a signed distance: 1 where d >> 0, 0 where d << 0, a linear ramp `edge` wide."""
    return np.clip(0.5 + np.asarray(d, dtype=np.float32) / edge, 0.0, 1.0)


def disc(x: np.ndarray, y: np.ndarray, cx: float, cy: float, r: float, edge: float) -> np.ndarray:
    """A soft-edged disc (or, with r = (rx, ry), an axis-aligned ellipse) as a mask."""
    rx, ry = (r, r) if np.isscalar(r) else r
    dist = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    return soft((1.0 - dist) * min(rx, ry), edge)


def smooth_noise(rng: np.random.Generator, width: int, height: int, cells: int) -> np.ndarray:
    """Unit-variance noise that varies over about width/cells pixels: a coarse random grid
    upsampled bicubically (far cheaper than filtering full-resolution noise at 2500 px)."""
    cells_y = max(2, round(cells * height / width))
    coarse = rng.standard_normal((cells_y, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))


def to_gray_image(density: np.ndarray, rng: np.random.Generator, noise: float) -> Image.Image:
    """Values in [0, 1] plus grain of std `noise` -> 8-bit grayscale image."""
    values = rng.standard_normal(density.shape, dtype=np.float32)
    values *= noise * 255  # in place: at 2500 px every full-size temporary costs
    values += density * 255 + 0.5
    return Image.fromarray(np.clip(values, 0, 255, out=values).astype(np.uint8))
