"""Procedural medical-like images written in the layouts of real public datasets.

Phantoms let the dataset readers, training and evaluation run end to end without downloading
credentialed data, and they have exact ground truth: what each image shows is known, captions
and labels are generated from it, and `phantom_truth.csv` (one row per image, an extra file
beside the official ones) records it for tests and evaluation.

    write_phantoms("mimic-cxr", 200, "data/mimic-phantoms")   # MIMIC-CXR-JPG 2.0.0 + reports
    write_phantoms("medvqa-gi", 100, "data/medvqa-phantoms")  # ImageCLEFmed MEDVQA-GI 2024 dev set
    write_phantoms("rocov2", 100, "data/roco-phantoms")       # ROCOv2 (ImageCLEFmedical caption)

Output is a function of the arguments only: the same seed writes byte-identical files.
"""

from __future__ import annotations

import os
from pathlib import Path

from ._common import atomic_output
from .colonoscopy import write_medvqa_gi
from .mimic import write_mimic_cxr
from .roco import write_rocov2

# layout -> (writer(out, n, seed, image_size), default image width in pixels)
LAYOUTS = {
    "mimic-cxr": (write_mimic_cxr, 256),
    "rocov2": (write_rocov2, 256),
    "medvqa-gi": (write_medvqa_gi, 256),
}


def write_phantoms(
    layout: str, n: int, out: str | os.PathLike, seed: int = 0, image_size: int | None = None
) -> Path:
    """Write `n` phantom images in `layout` (a key of LAYOUTS) to the new folder `out`.

    image_size: image width in pixels (heights follow each layout's aspect ratios); default 256.
        Up to ~3000 for benchmarks at the real datasets' resolutions.
    The folder appears complete or not at all (written next to it, then renamed); `out` must
    not exist yet or be empty. Returns `out` as a Path.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    writer, default_size = LAYOUTS[layout]
    size = image_size or default_size
    if size < 16:
        raise ValueError(f"image_size must be at least 16, got {size}")
    with atomic_output(out) as tmp:
        writer(tmp, n, seed, size)
    return Path(out)


__all__ = ["LAYOUTS", "write_phantoms"]
