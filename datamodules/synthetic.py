"""Generated images of a bright shape on one side: a dataset that needs no download.

The captions name the shape and its side, so a model that learns from them has to follow the
text, and a left/right mix-up (the error a horizontal flip would teach) is visible at a glance.
"""

from __future__ import annotations

import os
from itertools import product
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from .atomic import write_atomically
from .base import ImageTextDataModule, Record

KINDS = ("circle", "square")
SIDES = ("left", "right")


def make_shape_image(kind: str, side: str, size: int, seed: int) -> Image.Image:
    """A radiograph-like RGB image (three equal channels): a bright `kind` on the `side` half of
    a dark, slightly noisy background. Its size, position and brightness vary with `seed`."""
    if kind not in KINDS or side not in SIDES:
        raise ValueError(f"kind must be one of {KINDS} and side one of {SIDES}, got {kind!r}, {side!r}")
    rng = np.random.default_rng(seed)
    background = rng.normal(30, 8, size=(size, size)).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(background)
    # Half-width at most 0.2 and centre within 0.03 of its quarter line: the shape never
    # crosses the middle of the image.
    radius = size * rng.uniform(0.12, 0.2)
    cx = size * (0.25 if side == "left" else 0.75) + size * rng.uniform(-0.03, 0.03)
    cy = size * (0.5 + rng.uniform(-0.1, 0.1))
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    brightness = int(rng.integers(200, 256))
    draw = ImageDraw.Draw(img)
    if kind == "circle":
        draw.ellipse(box, fill=brightness)
    else:
        draw.rectangle(box, fill=brightness)
    return img.convert("RGB")


def synthetic_records(n: int, size: int, seed: int) -> list[Record]:
    """`n` in-memory images cycling through every (kind, side), captioned "a bright {kind} on the {side}"."""
    combos = list(product(KINDS, SIDES))
    # One seed per image, drawn from `seed`: the first k images are the same whatever n is.
    image_seeds = np.random.default_rng(seed).integers(0, 2**32, size=n)
    records = []
    for i, image_seed in enumerate(image_seeds):
        kind, side = combos[i % len(combos)]
        image = make_shape_image(kind, side, size, int(image_seed))
        records.append(Record(image, f"a bright {kind} on the {side}"))
    return records


class GeneratedImagesDataModule(ImageTextDataModule):
    """Images generated in memory at `image_size` by `generate(n, size, seed)` (a subclass's):
    n_train training records, and n_val validation records from another seed, so that they are
    new examples; the test split is the validation split. With n_val=0, validation runs on the
    training images."""

    generate = None  # (n, size, seed) -> list[Record]

    def __init__(
        self,
        n_train: int = 16,
        n_val: int = 4,
        seed: int = 0,
        image_size: int = 32,
        **kwargs,
    ):
        super().__init__(image_size=image_size, **kwargs)  # batch_size, ...: see ImageTextDataModule
        self.n_train = n_train
        self.n_val = n_val
        self.seed = seed

    def load_records(self, split: str) -> list[Record]:
        # Seeds 2s and 2s + 1: training and validation never share a stream, whatever the seed.
        if split == "train":
            return type(self).generate(self.n_train, self.image_size, 2 * self.seed)
        return type(self).generate(self.n_val, self.image_size, 2 * self.seed + 1)


class SyntheticShapesDataModule(GeneratedImagesDataModule):
    """Generated shapes (see `make_shape_image`): the four captions (kind x side) in turn."""

    generate = staticmethod(synthetic_records)


def write_synthetic_folder(
    out_dir: str | os.PathLike, n: int = 16, size: int = 64, seed: int = 0, val_fraction: float = 0.25
) -> Path:
    """Write `n` generated images to `out_dir/images/` and list them in `out_dir/metadata.csv`
    (columns image, prompt, split; the last `round(n * val_fraction)` rows are val). Returns the
    CSV's path, which CSVImageTextDataModule reads."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    n_train = n - round(n * val_fraction)
    rows = []
    for i, record in enumerate(synthetic_records(n, size, seed)):
        name = f"images/{i:04d}.png"
        record.image.save(out_dir / name)
        rows.append({"image": name, "prompt": record.prompt, "split": "train" if i < n_train else "val"})
    # The CSV comes last and appears whole (os.replace is atomic): if it exists, so do all images.
    csv_path = out_dir / "metadata.csv"
    table = pd.DataFrame(rows, columns=["image", "prompt", "split"])
    write_atomically(csv_path, lambda tmp: table.to_csv(tmp, index=False))
    return csv_path
