"""Image sets and their features: what every metric of an evaluation reads.

An `ImageSet` is the generated images or a split of real ones at the evaluation's common
resolution, loaded once as uint8 RGB; its features are extracted once per feature source and,
for the real sets, cached on disk per (images, resolution, extractor) so that every model
compared against the same real images reuses them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import torch
from PIL import Image

from datamodules.atomic import write_atomically
from datamodules.images import load_image, to_rgb

from .features import FeatureExtractor


def load_uint8(paths: Iterable[str | Path | Image.Image], size: int | None) -> torch.Tensor:
    """Images (files, or in-memory images as the synthetic dataset holds them) as uint8 RGB
    [N, 3, S, S]. With `size`, each is resized (bicubic, shorter side)
    and centre-cropped to it; without, all must already share one size (no resampling at all,
    as torch-fidelity reads a folder)."""
    arrays = []
    for path in paths:
        image = to_rgb(path) if isinstance(path, Image.Image) else load_image(path, draft_size=size)
        if size is not None and image.size != (size, size):
            scale = size / min(image.size)
            w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
            image = image.resize((w, h), Image.Resampling.BICUBIC)
            left, top = (w - size) // 2, (h - size) // 2
            image = image.crop((left, top, left + size, top + size))
        arrays.append(np.asarray(image))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"images of different sizes {sorted(shapes)[:3]}...: give a common --size")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def extract(extractor: FeatureExtractor, images: torch.Tensor, batch_size: int = 32) -> np.ndarray:
    return torch.cat(
        [extractor(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    ).numpy()


class FeatureSource(Protocol):
    """Turns an image set into features [N, D]; `label` says how (protocol, extractor, weights,
    preprocessing), and is what cached features are keyed by."""

    label: dict

    def features_of(self, images: ImageSet) -> np.ndarray: ...


@dataclass
class TensorFeatures:
    """A FeatureExtractor run on the set's uint8 images at the evaluation's common resolution."""

    extractor: FeatureExtractor
    protocol: str = "torch-fidelity"

    @property
    def label(self) -> dict:
        return {"protocol": self.protocol, **self.extractor.label}

    def features_of(self, images: ImageSet) -> np.ndarray:
        return extract(self.extractor, images.uint8())


@dataclass
class PathFeatures:
    """An FID protocol's pipeline (`evaluation.fid_protocols`). Those that read images as medsd does
    (torch-fidelity, torchmetrics: `features_of_uint8`) take the set's loaded images, so the files
    are decoded once per evaluation; clean-fid opens the files itself."""

    pipeline: object

    @property
    def label(self) -> dict:
        return self.pipeline.label

    def features_of(self, images: ImageSet) -> np.ndarray:
        reads_uint8 = getattr(self.pipeline, "features_of_uint8", None)
        if reads_uint8 is not None:
            return reads_uint8(images.uint8())
        if any(isinstance(p, Image.Image) for p in images.paths):
            raise ValueError(
                f"the {self.label['protocol']} protocol reads image files itself, and this dataset holds its "
                "images in memory: use --fid-protocol torch-fidelity"
            )
        return self.pipeline.features(images.paths)


@dataclass
class ImageSet:
    """Images compared by the metrics, with their features per source (cached on disk with `cache_dir`)."""

    paths: list[str | Path | Image.Image]
    size: int | None
    cache_dir: Path | None = None
    _images: torch.Tensor | None = field(default=None, repr=False)
    _features: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.paths)

    def uint8(self) -> torch.Tensor:
        if self._images is None:
            self._images = load_uint8(self.paths, self.size)
        return self._images

    def key(self, source: FeatureSource) -> str:
        """Names the images (files by path, in-memory images by their pixels), size and source."""
        names = [hashlib.sha256(p.tobytes()).hexdigest() if isinstance(p, Image.Image) else str(p)
                 for p in self.paths]  # fmt: skip
        text = json.dumps([names, self.size, source.label], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def features(self, source: FeatureSource) -> np.ndarray:
        """The set's features from `source`, extracted once; cached as .npy under `cache_dir`."""
        key = self.key(source)
        if key in self._features:
            return self._features[key]
        path = self.cache_dir / f"real-{key}.npy" if self.cache_dir is not None else None
        if path is not None and path.is_file():
            features = np.load(path, allow_pickle=False)
        else:
            features = source.features_of(self)
            if path is not None:
                write_atomically(path, lambda tmp: save_npy(tmp, features))
        self._features[key] = features
        return features


def save_npy(path: Path, array: np.ndarray) -> None:
    with path.open("wb") as file:  # a file object: np.save would add ".npy" to a temporary name
        np.save(file, array)


def save_csv(path: Path, table: pd.DataFrame) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: table.to_csv(tmp, index=False))
    return path
