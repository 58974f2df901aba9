"""Precision, recall, density and coverage of generated samples (Naeem et al., 2020).

FID folds fidelity and diversity into one number; these four split them, from k-nearest-neighbour
balls around the samples in a feature space (Naeem, Oh, Uh, Choi and Yoo, "Reliable Fidelity and
Diversity Metrics for Generative Models", ICML 2020; precision and recall after Kynkaanniemi et
al., NeurIPS 2019). With X the N real and Y the M generated features, NND_k(v) the distance from v
to its k-th nearest neighbour within its own set, and B(v, r) the ball of radius r around v:

    precision = 1/M  sum_j  1[Y_j in some B(X_i, NND_k(X_i))]     (fakes on the real manifold)
    recall    = 1/N  sum_i  1[X_i in some B(Y_j, NND_k(Y_j))]     (reals on the fake manifold)
    density   = 1/(kM) sum_j sum_i 1[Y_j in B(X_i, NND_k(X_i))]   (how many real balls hold a fake)
    coverage  = 1/N  sum_i  1[min_j d(X_i, Y_j) < NND_k(X_i)]     (real balls holding any fake)

Density is not bounded by 1 (fakes packed where the reals are dense score above 1), and density and
coverage rely only on balls around real samples, which makes them robust to generated outliers.
k = 5, as the paper recommends and CheXGenBench (Dutt et al., 2025) reports.

The numbers come from the authors' `prdc` package (`prdc.compute_prdc`, Euclidean distances from
scikit-learn): "in a ball" there is a strict inequality, so a sample exactly on a radius is
outside. It holds three dense distance matrices (N x N, M x M and N x M float64, 8 (N^2 + M^2 +
NM) bytes: about 2.4 GB at N = M = 10,000).
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch


def _features(name: str, features: torch.Tensor | np.ndarray) -> np.ndarray:
    array = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    if array.ndim != 2:
        raise ValueError(f"{name} features must be a 2-D array [N, D], got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{name} features must be numeric, got dtype {array.dtype}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} features contain NaN or infinite values")
    return array.astype(np.float64, copy=False)


def precision_recall_density_coverage(
    real: torch.Tensor | np.ndarray, fake: torch.Tensor | np.ndarray, k: int = 5
) -> dict[str, float]:
    """Precision, recall, density and coverage of fake [M, D] against real [N, D] features.

    Both sets need at least k + 2 samples: besides the k neighbours and the sample itself, `prdc`
    takes the k-NN radius with `numpy.argpartition(distances, k + 1)`, which needs a row longer than
    k + 1. Returns {"precision", "recall", "density", "coverage"} as Python floats.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    x, y = _features("real", real), _features("fake", fake)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: real {x.shape[1]}, fake {y.shape[1]}")
    for name, array in (("real", x), ("fake", y)):
        if len(array) < k + 2:
            raise ValueError(
                f"PRDC with k={k} needs at least k + 2 = {k + 2} {name} samples (a k-NN radius within "
                f"the set, as prdc computes it), got {len(array)}"
            )
    from prdc import compute_prdc

    with contextlib.redirect_stdout(io.StringIO()):  # compute_prdc prints the two set sizes
        values = compute_prdc(real_features=x, fake_features=y, nearest_k=int(k))
    return {name: float(values[name]) for name in ("precision", "recall", "density", "coverage")}
