"""Kernel Inception Distance: an unbiased estimate of the squared MMD between two feature sets.

FID is biased upward at small N (its covariance is rank-deficient under D samples); KID is not,
which makes it the fairer number for the small sample sets of few-shot fine-tuning. The estimator
is that of Binkowski et al. (2018) as torch-fidelity computes it: a cubic polynomial kernel
k(x, y) = (gamma x.y + coef0)^degree with gamma = 1/D, the unbiased MMD^2 on random subsets drawn
without replacement, reported as mean and (population) standard deviation over the subsets.
Subsets are drawn in torch-fidelity's order from `numpy.random.RandomState(seed)`, so with the
same seed and float64 features the two give the same numbers (torch-fidelity's default seed is
2020; ours is 0).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .bootstrap import bootstrap_ci

log = logging.getLogger(__name__)


def _features(name: str, features: torch.Tensor | np.ndarray) -> np.ndarray:
    array = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    if array.ndim != 2:
        raise ValueError(f"{name} features must be [N, D], got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} features contain NaN or infinite values")
    return array.astype(np.float64, copy=False)


def polynomial_kernel(a: np.ndarray, b: np.ndarray, degree: int, gamma: float, coef0: float) -> np.ndarray:
    """The kernel matrix k(a_i, b_j) = (gamma a_i.b_j + coef0)^degree, [len(a), len(b)].

    One definition for KID and its bootstrap interval, so that the interval is always about the
    kernel the reported KID uses.
    """
    return (a @ b.T * gamma + coef0) ** degree


def polynomial_mmd2(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef0: float) -> float:
    """Unbiased MMD^2 between two equally sized samples [m, D] under a polynomial kernel.

    Within-set terms leave out the diagonal k(x_i, x_i) (the U-statistic); the cross term keeps all
    m^2 pairs, as in torch-fidelity.
    """
    m = x.shape[0]
    k_xx = polynomial_kernel(x, x, degree, gamma, coef0)
    k_yy = polynomial_kernel(y, y, degree, gamma, coef0)
    k_xy = polynomial_kernel(x, y, degree, gamma, coef0)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / (m * m))


def kernel_inception_distance(
    real: torch.Tensor | np.ndarray,
    fake: torch.Tensor | np.ndarray,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    """KID between real [N, D] and generated [M, D] features: (mean, std) of MMD^2 over subsets.

    A subset size above min(N, M) is lowered to it with a warning: the mean stays unbiased, each
    subset's estimate is just noisier (and with subset_size = N every subset holds all of the
    smaller set, so the std no longer reflects its sampling).
    """
    x, y = _features("real", real), _features("fake", fake)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: real {x.shape[1]}, fake {y.shape[1]}")
    if subsets < 1:
        raise ValueError(f"subsets must be at least 1, got {subsets}")
    limit = min(len(x), len(y))
    if limit < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got real {len(x)}, fake {len(y)}")
    if subset_size > limit:
        log.warning("KID subset size %d lowered to %d, the size of the smaller set", subset_size, limit)
        subset_size = limit
    gamma = 1.0 / x.shape[1] if gamma is None else gamma

    rng = np.random.RandomState(seed)
    mmds = np.empty(subsets)
    for i in range(subsets):
        x_subset = x[rng.choice(len(x), subset_size, replace=False)]
        y_subset = y[rng.choice(len(y), subset_size, replace=False)]
        mmds[i] = polynomial_mmd2(x_subset, y_subset, degree, gamma, coef0)
    return float(mmds.mean()), float(mmds.std())


def kid_bootstrap_ci(
    real: torch.Tensor | np.ndarray,
    fake: torch.Tensor | np.ndarray,
    resamples: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    groups=None,
) -> tuple[float | None, float | None]:
    """Bootstrap interval of the squared MMD from the fixed real features to resampled generated ones.

    Only the generated set is resampled: KID is unbiased at any N, so resampling with replacement
    does not shift it as it does FID. `groups` (the rows of each prompt) resamples whole prompts
    (see `evaluation.bootstrap`). Each resample's MMD^2 is the unbiased full-set estimate (every
    real and generated sample at once, not subsets: it has the same expectation as the subset mean
    that KID reports), computed from kernel matrices built once: with c the resample's count of
    each generated sample and T its size, the generated-generated term averages k over pairs of
    distinct samples, (c'Kc - sum c_i^2 K_ii) / (T^2 - sum c_i^2), so a sample drawn
    twice is never paired with itself. Memory: an M x M and an N x M float64 matrix.
    """
    x, y = _features("real", real), _features("fake", fake)
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got real {len(x)}, fake {len(y)}")
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    k_xx = polynomial_kernel(x, x, degree, gamma, coef0)
    n, m = len(x), len(y)
    real_term = (k_xx.sum() - np.trace(k_xx)) / (n * (n - 1))
    del k_xx
    cross = polynomial_kernel(x, y, degree, gamma, coef0).mean(axis=0)  # [M]: mean kernel to the real set
    k_yy = polynomial_kernel(y, y, degree, gamma, coef0)
    diagonal = np.diag(k_yy).copy()

    def mmd2(indices: np.ndarray) -> float:
        counts = np.bincount(indices, minlength=m).astype(np.float64)
        total, same = len(indices), (counts**2).sum()
        if same >= total * total:  # one sample drawn every time: no pair of distinct samples
            return float("nan")
        fake_term = (counts @ k_yy @ counts - (counts**2 * diagonal).sum()) / (total * total - same)
        return float(real_term + fake_term - 2 * counts @ cross / total)

    return bootstrap_ci(mmd2, m, resamples, confidence, seed, groups)
