"""Percentile bootstrap confidence intervals for evaluation scores.

Scores such as FID or a classifier's accuracy on a few thousand generated images move by more
than the gaps between configurations that papers report, so a comparison needs an interval. The
bootstrap redraws the n samples with replacement, recomputes the score on each redraw and takes
the central `confidence` share of the recomputed scores.

For FID only the generated set is resampled: the real statistics are a fixed reference (computed
once, cached, identical for every model compared), so the interval describes the uncertainty of
the model's score given that reference. Resampling with replacement repeats samples, which lowers
the effective sample size and biases each resampled FID upward; the interval therefore sits
somewhat above the point estimate and measures its spread, not an unbiased range. Each resample
costs one D x D covariance and one Fréchet distance (about 1-3 s at D=2048 on a CPU).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .statistics import FeatureStatistics, frechet_distance_to_samples


def bootstrap_intervals(
    statistics: Callable[[np.ndarray], dict[str, float]],
    n: int,
    resamples: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float | None, float | None]]:
    """Percentile intervals of several scores computed on the same resamples (a paired bootstrap).

    `statistics` receives `n` indices into the caller's samples, drawn with replacement, and
    returns named scores of that resample. A score may be NaN on some resamples (an AUROC when a
    resample holds a single class): those resamples are left out of that score's interval, and a
    score undefined on more than half of them gets (None, None) rather than an interval from the
    few resamples that happened to work. The same seed gives the same intervals.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    draws = [statistics(rng.integers(n, size=n)) for _ in range(resamples)]
    tail = (1 - confidence) / 2
    intervals = {}
    for name in draws[0]:
        values = np.array([draw[name] for draw in draws], dtype=np.float64)
        values = values[np.isfinite(values)]
        if len(values) * 2 < resamples:
            intervals[name] = (None, None)
            continue
        low, high = np.quantile(values, [tail, 1 - tail])
        intervals[name] = (float(low), float(high))
    return intervals


def bootstrap_ci(
    statistic: Callable[[np.ndarray], float],
    n: int,
    resamples: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float | None, float | None]:
    """Percentile interval of one score `statistic(indices)` (see `bootstrap_intervals`)."""
    return bootstrap_intervals(lambda indices: {"score": statistic(indices)}, n, resamples, confidence, seed)[
        "score"
    ]


def fid_bootstrap_ci(
    real: FeatureStatistics,
    fake_features: torch.Tensor | np.ndarray,
    resamples: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Bootstrap interval of the Fréchet distance from fixed real statistics to generated features [M, D].

    Only the generated features are resampled (see the module docstring for why, and for the
    upward bias of resampled FIDs).
    """
    real_mean, real_covariance = real.mean, real.covariance
    features = torch.as_tensor(fake_features)

    def fid_of(indices: np.ndarray) -> float:
        resampled = features[torch.as_tensor(indices, device=features.device)]
        return frechet_distance_to_samples(real_mean, real_covariance, resampled)

    return bootstrap_ci(fid_of, len(features), resamples, confidence, seed)
