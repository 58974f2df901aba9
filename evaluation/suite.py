"""The evaluation suite: generated images (a `medsd sample` manifest) against real images.

Each metric is a small function over features or images; `evaluate` runs those it can and
returns rows, each labelled with what the number was computed on (extractor, weights,
preprocessing, N), so that numbers from different settings are never silently compared.
A metric whose extractor weights are missing is skipped with the reason, the others still run.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from datamodules.atomic import write_atomically
from datamodules.base import stack_labels
from datamodules.images import load_image, to_rgb

from .bootstrap import bootstrap_ci, fid_bootstrap_ci
from .features import CLIPFeatures, FeatureExtractor, MissingWeightsError
from .kid import kernel_inception_distance, kid_bootstrap_ci
from .ms_ssim import cross_prompt_diversity, intra_prompt_diversity
from .statistics import FeatureStatistics, frechet_distance

log = logging.getLogger(__name__)


@dataclass
class Generated:
    """The images of a sampling run, grouped by prompt (from its manifest.csv)."""

    paths: list[Path]
    prompts: list[str]
    prompt_index: list[int]
    labels: list[dict | None]

    @classmethod
    def from_manifest(cls, folder: str | Path) -> Generated:
        folder = Path(folder)
        path = folder / "manifest.csv"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: give the output folder of `medsd sample`")
        table = pd.read_csv(path, dtype={"prompt": str}, keep_default_na=False)
        missing = {"prompt_index", "prompt", "path"} - set(table.columns)
        if missing:
            raise ValueError(
                f"{path} has no column(s) {sorted(missing)}; columns found: {list(table.columns)}"
            )
        labels = [json.loads(v) if v else None for v in table["labels"]] if "labels" in table else None
        return cls(
            paths=[folder / p for p in table["path"]],
            prompts=list(table["prompt"]),
            prompt_index=[int(i) for i in table["prompt_index"]],
            labels=labels or [None] * len(table),
        )

    def stated_labels(self) -> tuple[list[str], torch.Tensor, torch.Tensor, int]:
        """What each image's prompt states: (label names, CheXpert values [N, L], labelled [N] bool,
        number of conflicting values).

        A prompt shared by records with different labels (two reports with the same impression)
        carries several label sets; where they disagree on a label, the image gets -1 (uncertain)
        for it, which the protocols leave out, rather than one report's value. Images whose prompt
        has no labels are marked unlabelled (all NaN).
        """
        sets = [label_sets or [] for label_sets in self.labels]
        names = next((list(label_sets[0]) for label_sets in sets if label_sets), [])
        if not names:
            raise ValueError("the manifest's prompts carry no labels (sample from a labelled dataset split)")
        values = torch.full((len(sets), len(names)), float("nan"))
        conflicts = 0
        for i, label_sets in enumerate(sets):
            if not label_sets:
                continue
            _, stacked = stack_labels([{name: row.get(name) for name in names} for row in label_sets])
            first = stacked[0]
            agree = ((stacked == first) | (stacked.isnan() & first.isnan())).all(dim=0)
            values[i] = torch.where(agree, first, torch.tensor(-1.0))
            conflicts += int((~agree).sum())
        labelled = torch.tensor([bool(label_sets) for label_sets in sets])
        return names, values, labelled, conflicts

    def groups(self) -> list[list[int]]:
        """Row numbers of the images of each prompt."""
        by_prompt: dict[int, list[int]] = {}
        for row, index in enumerate(self.prompt_index):
            by_prompt.setdefault(index, []).append(row)
        return list(by_prompt.values())


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


@dataclass
class RealSet:
    """The real images compared against, with a cache of their statistics per extractor."""

    paths: list[str | Image.Image]
    size: int | None
    cache_dir: Path | None = None
    _images: torch.Tensor | None = field(default=None, repr=False)

    def images(self) -> torch.Tensor:
        if self._images is None:
            self._images = load_uint8(self.paths, self.size)
        return self._images

    def key(self, extractor: FeatureExtractor) -> str:
        """Names the images (files by path, in-memory images by their pixels), size and extractor."""
        names = [hashlib.sha256(p.tobytes()).hexdigest() if isinstance(p, Image.Image) else str(p)
                 for p in self.paths]  # fmt: skip
        text = json.dumps([names, self.size, extractor.label], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def features(self, extractor: FeatureExtractor) -> np.ndarray:
        """Real features, cached per (images, resolution, extractor) as .npy next to statistics."""
        if self.cache_dir is not None:
            path = self.cache_dir / f"real-{self.key(extractor)}.npy"
            if path.is_file():
                return np.load(path)
        features = extract(extractor, self.images())
        if self.cache_dir is not None:
            write_atomically(path, lambda tmp: save_npy(tmp, features))
        return features


def save_npy(path: Path, array: np.ndarray) -> None:
    with path.open("wb") as file:  # a file object: np.save would add ".npy" to a temporary name
        np.save(file, array)


def statistics_of(features: np.ndarray) -> FeatureStatistics:
    return FeatureStatistics().update(features)


def fid_and_kid(real: np.ndarray, fake: np.ndarray, resamples: int, seed: int) -> list[dict]:
    real_stats, fake_stats = statistics_of(real), statistics_of(fake)
    fid = frechet_distance(real_stats.mean, real_stats.covariance, fake_stats.mean, fake_stats.covariance)
    low, high = (
        fid_bootstrap_ci(real_stats, fake, resamples=resamples, seed=seed) if resamples else (None, None)
    )
    kid, kid_std = kernel_inception_distance(real, fake, seed=seed)
    kid_low, kid_high = (
        kid_bootstrap_ci(real, fake, resamples=resamples, seed=seed) if resamples else (None, None)
    )
    return [
        {"metric": "fid", "value": fid, "ci_low": low, "ci_high": high},
        {"metric": "kid", "value": kid, "std": kid_std, "ci_low": kid_low, "ci_high": kid_high},
    ]


def memorisation(real_train: np.ndarray, real_heldout: np.ndarray, fake: np.ndarray, quantile: float) -> dict:
    """Share of generated images closer to a training image than real held-out images usually are.

    Distances are cosine distances to the nearest training image. The threshold is the
    `quantile` of held-out real images' nearest-training distances: a synthetic image closer than
    that is as close to a training image as only the closest few % of genuinely new images are.
    """

    def nearest(x: np.ndarray) -> np.ndarray:
        a = x / np.linalg.norm(x, axis=1, keepdims=True)
        b = real_train / np.linalg.norm(real_train, axis=1, keepdims=True)
        return 1 - (a @ b.T).max(axis=1)

    threshold = float(np.quantile(nearest(real_heldout), quantile))
    distances = nearest(fake)
    return {
        "metric": "memorisation_share",
        "value": float((distances < threshold).mean()),
        "threshold": threshold,
        "quantile": quantile,
        "median_nearest_distance": float(np.median(distances)),
    }


def diversity(generated: Generated, images: torch.Tensor) -> list[dict]:
    groups = [images[rows] for rows in generated.groups() if len(rows) >= 2]
    rows = []
    if groups:
        intra = intra_prompt_diversity(groups)
        rows.append({"metric": "ms_ssim_intra_prompt", "value": intra.pop("ms_ssim"), **intra})
    all_groups = [images[rows_] for rows_ in generated.groups()]
    if len(all_groups) >= 2:
        cross = cross_prompt_diversity(all_groups)
        rows.append({"metric": "ms_ssim_cross_prompt", "value": cross.pop("ms_ssim"), **cross})
    return rows


def run_metric(name: str, rows: list[dict], skipped: dict, compute: Callable[[], list[dict]]) -> None:
    """Append `compute()`'s rows, or record why the metric was skipped; the others still run."""
    try:
        rows.extend(compute())
    except (MissingWeightsError, ValueError) as error:
        log.warning("skipping %s: %s", name, error)
        skipped[name] = str(error)


def clip_score(
    extractor: CLIPFeatures, image_features: np.ndarray, prompts: list[str], resamples: int, seed: int
) -> list[dict]:
    """Prompt alignment: the mean over images of 100 * max(cos(image, prompt), 0) in the CLIP
    embedding space (the CLIPScore convention of torchmetrics), with a bootstrap interval over images.

    image_features: the extractor's normalised image embeddings of the generated images, in
    manifest order; prompts: each image's prompt.
    """
    unique = list(dict.fromkeys(prompts))
    text, at_limit = extractor.text_features(unique)
    rows = torch.as_tensor([unique.index(p) for p in prompts])
    cosine = (torch.as_tensor(image_features) * text[rows]).sum(dim=1).numpy()
    scores = 100 * np.maximum(cosine, 0)
    low, high = (
        bootstrap_ci(lambda i: float(scores[i].mean()), len(scores), resamples, seed=seed)
        if resamples
        else (None, None)
    )
    return [
        {
            "metric": "clip_score",
            "value": float(scores.mean()),
            "ci_low": low,
            "ci_high": high,
            "prompts": len(unique),
            "prompts_at_context_limit": at_limit,
        }
    ]
