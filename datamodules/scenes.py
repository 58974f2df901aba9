"""Generated grey-level scenes with captions that say where things are: the demo base model's
pretraining domain.

Stable Diffusion meets radiographs with a VAE that has seen every kind of image and a U-Net
whose cross-attention already ties words to places, sizes and brightness. The demo's base model
(experiments/pretrain_demo_base.py) needs both at CPU scale, and nothing of chest X-rays: each
scene is a background of some grey level and gradient with one to three shapes (circles,
squares, bars; small or large; brighter or darker than the background; flat or speckled) at
named places, and thin lines now and then. The caption names every shape:
"a large bright circle at the bottom left and a small dark square at the top".
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from .base import Record
from .synthetic import GeneratedImagesDataModule

KINDS = ("circle", "square", "bar")
SIZES = {"small": (0.08, 0.13), "large": (0.18, 0.27)}  # half-width as a fraction of the side
# Place name -> centre (x, y) as fractions of the side; "" is the middle row or column.
COLUMNS = {"left": 0.27, "": 0.5, "right": 0.73}
ROWS = {"top": 0.27, "": 0.5, "bottom": 0.73}


def place_name(row: str, column: str) -> str:
    if not row:
        return f"on the {column}" if column else "in the centre"
    return "at the " + " ".join(part for part in (row, column) if part)


def draw_shape(img: np.ndarray, kind: str, box: tuple[float, float, float, float], level: float,
               speckle: bool, rng: np.random.Generator) -> None:  # fmt: skip
    """Fill `kind` inside `box` (x0, y0, x1, y1) with grey `level`, speckled or flat, in place."""
    mask_img = Image.new("L", (img.shape[1], img.shape[0]), 0)
    draw = ImageDraw.Draw(mask_img)
    if kind == "circle":
        draw.ellipse(box, fill=255)
    elif kind == "square":
        draw.rectangle(box, fill=255)
    else:  # a bar: wide and low, with rounded ends
        x0, y0, x1, y1 = box
        half_height = (y1 - y0) * 0.2
        middle = (y0 + y1) / 2
        bar = (x0, middle - half_height, x1, middle + half_height)
        draw.rounded_rectangle(bar, radius=half_height, fill=255)
    mask = np.asarray(mask_img, dtype=np.float32) / 255
    fill = np.full(img.shape, level, dtype=np.float32)
    if speckle:
        fill += rng.normal(0, 18, size=img.shape)
    img[:] = img * (1 - mask) + fill * mask


def make_scene(size: int, seed: int) -> tuple[Image.Image, str]:
    """One scene (an RGB image of three equal channels) and its caption, both from `seed`."""
    rng = np.random.default_rng(seed)
    background = rng.uniform(25, 190)
    gradient = rng.uniform(-40, 40) * np.linspace(-0.5, 0.5, size)[:, None]
    img = np.full((size, size), background, dtype=np.float32) + gradient
    places = [(r, c) for r in ROWS for c in COLUMNS]
    chosen = rng.choice(len(places), size=int(rng.integers(1, 4)), replace=False)
    phrases = []
    for index in chosen:
        row, column = places[index]
        kind = KINDS[rng.integers(len(KINDS))]
        size_name = "small" if rng.random() < 0.5 else "large"
        bright = background < 70 or (background < 160 and rng.random() < 0.6)
        level = background + (1 if bright else -1) * rng.uniform(60, 110)
        half = size * rng.uniform(*SIZES[size_name])
        cx = size * (COLUMNS[column] + rng.uniform(-0.04, 0.04))
        cy = size * (ROWS[row] + rng.uniform(-0.04, 0.04))
        draw_shape(img, kind, (cx - half, cy - half, cx + half, cy + half), level, rng.random() < 0.3, rng)
        brightness = "bright" if bright else "dark"
        phrases.append(f"a {size_name} {brightness} {kind} {place_name(row, column)}")
    if rng.random() < 0.3:  # thin lines, as wires and edges are in radiographs
        line_img = Image.fromarray(img)
        draw = ImageDraw.Draw(line_img)
        for _ in range(int(rng.integers(1, 3))):
            points = [tuple(rng.uniform(0, size, 2)) for _ in range(3)]
            draw.line(points, fill=float(rng.choice([15.0, 245.0])), width=1)
        img = np.array(line_img, dtype=np.float32)
        phrases.append("thin lines")
    img += rng.normal(0, 4, size=img.shape)
    pixels = img.clip(0, 255).astype(np.uint8)
    return Image.fromarray(pixels).convert("RGB"), " and ".join(phrases)


def scene_records(n: int, size: int, seed: int) -> list[Record]:
    """`n` scenes drawn at twice `size` and reduced, so that edges are smooth as in a resized
    photograph; the first k are the same whatever n is (one seed per scene, drawn from `seed`)."""
    records = []
    for scene_seed in np.random.default_rng(seed).integers(0, 2**32, size=n):
        image, caption = make_scene(2 * size, int(scene_seed))
        records.append(Record(image.resize((size, size), Image.BOX), caption))
    return records


class SyntheticScenesDataModule(GeneratedImagesDataModule):
    """Generated scenes (see `make_scene`); options as GeneratedImagesDataModule's."""

    generate = staticmethod(scene_records)
