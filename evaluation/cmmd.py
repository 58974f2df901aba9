"""CMMD: the squared maximum mean discrepancy between CLIP image embeddings (Jayasumana et al. 2024).

Jayasumana, Ramalingam, Veit, Glasner, Chakrabarti and Kumar, "Rethinking FID: Towards a Better
Evaluation Metric for Image Generation", CVPR 2024, replace FID's Gaussian fit of Inception features
by an MMD with a Gaussian RBF kernel over CLIP embeddings: no normality assumption, and an estimate
that does not depend on the sample size the way FID's bias does.

The estimator is the one of the authors' published implementation (google-research/google-research,
`cmmd/distance.py`, function `mmd`): the minimum-variance (biased, V-statistic) estimate of
Gretton et al. (JMLR 2012, eq. 5), in which every mean runs over all pairs, diagonal included,

    CMMD = scale * ( mean_{i,i'} k(x_i, x_i') + mean_{j,j'} k(y_j, y_j') - 2 mean_{i,j} k(x_i, y_j) ),
    k(a, b) = exp(-||a - b||^2 / (2 sigma^2)),   sigma = 10,   scale = 1000,

with the squared distances expanded as ||a||^2 + ||b||^2 - 2 a.b as there. It is 0 for two
identical sets and never negative (it is the squared RKHS distance of the two empirical mean
embeddings). The reference feeds it L2-normalised CLIP ViT-L/14 (336 px) image embeddings, the
default output of the Scenic CLIP model it uses; CMMD values are only comparable across the same
embedding model and preprocessing. Differences from the reference, none of which changes the
formula: float64 throughout (the reference runs in JAX's default float32), squared distances that
round-off pushes below 0 are clamped at 0 (an effect below 1e-15 on the kernel), the two sets may
differ in size, and the kernel means are summed over blocks of at most BLOCK x BLOCK pairs, so
memory stays bounded (128 MB per block) for large sets.
"""

from __future__ import annotations

import numpy as np
import torch

BLOCK = 4096


def _features(name: str, features: torch.Tensor | np.ndarray) -> np.ndarray:
    array = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    if array.ndim != 2:
        raise ValueError(f"{name} embeddings must be a 2-D array [N, D], got shape {array.shape}")
    if len(array) == 0:
        raise ValueError(f"{name} embeddings are empty")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} embeddings contain NaN or infinite values")
    return array.astype(np.float64, copy=False)


def _mean_kernel(a: np.ndarray, b: np.ndarray, gamma: float) -> float:
    """Mean of exp(-gamma ||a_i - b_j||^2) over all len(a) x len(b) pairs, summed block by block."""
    a_norms, b_norms = (a * a).sum(axis=1), (b * b).sum(axis=1)
    total = 0.0
    for i in range(0, len(a), BLOCK):
        rows = slice(i, i + BLOCK)
        for j in range(0, len(b), BLOCK):
            columns = slice(j, j + BLOCK)
            squared = a_norms[rows, None] + b_norms[None, columns] - 2 * a[rows] @ b[columns].T
            np.maximum(squared, 0.0, out=squared)
            total += float(np.exp(-gamma * squared).sum())
    return total / (len(a) * len(b))


def cmmd(
    real: torch.Tensor | np.ndarray,
    fake: torch.Tensor | np.ndarray,
    sigma: float = 10.0,
    scale: float = 1000.0,
) -> float:
    """CMMD between real [N, D] and generated [M, D] embeddings (the reference's biased MMD^2 x scale)."""
    x, y = _features("real", real), _features("fake", fake)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"embedding dimensions differ: real {x.shape[1]}, fake {y.shape[1]}")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    gamma = 1.0 / (2.0 * sigma**2)
    k_xx, k_yy, k_xy = _mean_kernel(x, x, gamma), _mean_kernel(y, y, gamma), _mean_kernel(x, y, gamma)
    return float(scale * (k_xx + k_yy - 2.0 * k_xy))
