"""Feature statistics and the Fréchet distance between two Gaussians fitted to them.

FID compares the mean and covariance of two feature sets, so the only state an evaluation needs
is (n, mean, covariance) per set. `FeatureStatistics` streams them batch by batch in float64
(float32 sums over thousands of 2048-d vectors lose digits that the Fréchet distance amplifies),
merges the moments of other ranks exactly, and caches a set's statistics as a small .npz file so
the real images are encoded once.

`frechet_distance` avoids `scipy.linalg.sqrtm`, which is slow (about 18 s at d=2048 on a 2-core
CPU), returns complex round-off for near-singular covariances and was broken in SciPy 1.11.2-1.12.
The trace term only needs tr sqrt(sigma1 sigma2), and sigma1 sigma2 is similar to the symmetric
positive semi-definite S sigma2 S with S = sqrt(sigma1): the same eigenvalues, obtained from two
symmetric eigen-decompositions that are stable and several times faster.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from datamodules.atomic import write_atomically

ArrayLike = torch.Tensor | np.ndarray


def _as_float64(array: ArrayLike, device: torch.device | str | None = None) -> torch.Tensor:
    tensor = torch.from_numpy(np.asarray(array)) if not isinstance(array, torch.Tensor) else array
    return tensor.detach().to(device=device if device is not None else tensor.device, dtype=torch.float64)


class FeatureStatistics:
    """Running count, mean and scatter matrix (sum of squared deviations) of [B, D] feature batches.

    Batches are folded in with the pairwise update of Chan et al. (1979): each batch's own mean and
    scatter are computed centred, then combined with the running ones through the difference of the
    means. Unlike the raw sums of x and x x^T this never subtracts two large, nearly equal numbers,
    so it stays accurate when the features have a large mean. The state lives in float64 on the
    device of the first batch (a GPU does the D x D products of each batch much faster).
    """

    def __init__(self) -> None:
        self.n = 0
        self._mean: torch.Tensor | None = None
        self._scatter: torch.Tensor | None = None

    @property
    def dim(self) -> int | None:
        return None if self._mean is None else self._mean.numel()

    def update(self, features: ArrayLike) -> FeatureStatistics:
        """Adds a batch of feature vectors [B, D]; returns self."""
        if features.ndim != 2:
            raise ValueError(f"features must be [batch, dim], got shape {tuple(features.shape)}")
        batch = _as_float64(features, None if self._mean is None else self._mean.device)
        if batch.shape[0] == 0:
            return self
        if not torch.isfinite(batch).all():
            raise ValueError("features contain NaN or infinite values")
        mean = batch.mean(dim=0)
        centred = batch - mean
        self._combine(batch.shape[0], mean, centred.T @ centred)
        return self

    def merge(self, other: FeatureStatistics) -> FeatureStatistics:
        """Adds the samples summarised by `other` (e.g. another rank's statistics); returns self."""
        if other.n > 0:
            self._combine(other.n, other._mean, other._scatter)
        return self

    def _combine(self, n: int, mean: torch.Tensor, scatter: torch.Tensor) -> None:
        if self._mean is None:
            self.n, self._mean, self._scatter = n, mean.clone(), scatter.clone()
            return
        if mean.numel() != self._mean.numel():
            raise ValueError(f"feature dimension {mean.numel()} does not match the statistics' {self.dim}")
        mean, scatter = mean.to(self._mean.device), scatter.to(self._mean.device)
        total = self.n + n
        delta = mean - self._mean
        self._mean = self._mean + delta * (n / total)
        self._scatter = self._scatter + scatter + torch.outer(delta, delta) * (self.n * n / total)
        self.n = total

    @property
    def mean(self) -> np.ndarray:
        """Mean feature vector [D], float64."""
        if self._mean is None:
            raise ValueError("no features have been added")
        return self._mean.cpu().numpy()

    @property
    def covariance(self) -> np.ndarray:
        """Unbiased covariance [D, D] (divides by n - 1, as numpy.cov), float64."""
        if self.n < 2:
            raise ValueError(f"the covariance needs at least 2 samples, got {self.n}")
        return (self._scatter / (self.n - 1)).cpu().numpy()

    def save(self, path: str | Path) -> None:
        """Writes n, mean and scatter to an .npz file atomically: a reader never sees half a file.

        The scatter, not the covariance, is stored so that loaded statistics can still be merged.
        """
        if self._mean is None:
            raise ValueError("no features have been added")
        arrays = dict(n=np.int64(self.n), mean=self.mean, scatter=self._scatter.cpu().numpy())

        def save(tmp: Path) -> None:
            with tmp.open("wb") as file:  # a file object: np.savez would add ".npz" to a name
                np.savez(file, **arrays)

        write_atomically(Path(path), save, sync=True)

    @classmethod
    def load(cls, path: str | Path) -> FeatureStatistics:
        """Reads statistics written by `save`."""
        with np.load(path) as data:
            stats = cls()
            stats.n = int(data["n"])
            stats._mean = torch.from_numpy(data["mean"].astype(np.float64))
            stats._scatter = torch.from_numpy(data["scatter"].astype(np.float64))
        return stats


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Fréchet distance ||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), in float64.

    Computed on the device of `mu1` when it is a tensor (CPU for numpy arrays). Eigenvalues that
    round-off pushes below zero are clamped at 0, which also makes rank-deficient covariances
    (fewer samples than dimensions) safe.
    """
    device = mu1.device if isinstance(mu1, torch.Tensor) else torch.device("cpu")
    mu1, sigma1, mu2, sigma2 = (_as_float64(a, device) for a in (mu1, sigma1, mu2, sigma2))
    dim = mu1.numel()
    for name, mu in (("mu1", mu1), ("mu2", mu2)):
        if mu.shape != (dim,):
            raise ValueError(f"{name} must be a vector of length {dim}, got shape {tuple(mu.shape)}")
    for name, sigma in (("sigma1", sigma1), ("sigma2", sigma2)):
        if sigma.shape != (dim, dim):
            raise ValueError(f"{name} must be {dim} x {dim} to match the means, got {tuple(sigma.shape)}")
    for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not torch.isfinite(a).all():
            raise ValueError(f"{name} contains NaN or infinite values")

    eigenvalues, eigenvectors = torch.linalg.eigh((sigma1 + sigma1.T) / 2)
    sqrt_sigma1 = (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T
    product = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    trace_sqrt = torch.linalg.eigvalsh((product + product.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt
    return float(distance)


def frechet_distance_of_samples(x: ArrayLike, y: ArrayLike) -> float:
    """`frechet_distance` between the means and unbiased covariances of two sample sets [N1, D], [N2, D].

    With fewer samples than dimensions in either set (the subsamples of an FID interval in
    2048-d features) it avoids every D x D eigendecomposition, exactly: with A and B the centred
    samples over sqrt(N - 1), sigma1 = A^T A and sigma2 = B^T B, and sigma1 sigma2 has the same
    nonzero eigenvalues as (A B^T)(A B^T)^T, so tr((sigma1 sigma2)^(1/2)) is the sum of the
    singular values of the N1 x N2 matrix A B^T.
    """
    device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
    x, y = _as_float64(x, device), _as_float64(y, device)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"samples must be [N, D] with one D, got {tuple(x.shape)} and {tuple(y.shape)}")
    (n1, dim), n2 = x.shape, y.shape[0]
    if min(n1, n2) < 2:
        raise ValueError(f"the covariance needs at least 2 samples, got {n1} and {n2}")
    if min(n1, n2) >= dim:
        first, second = FeatureStatistics().update(x), FeatureStatistics().update(y)
        return frechet_distance(first.mean, first.covariance, second.mean, second.covariance)
    mean_x, mean_y = x.mean(dim=0), y.mean(dim=0)
    a, b = (x - mean_x) / (n1 - 1) ** 0.5, (y - mean_y) / (n2 - 1) ** 0.5
    trace_sqrt = torch.linalg.svdvals(a @ b.T).sum()
    distance = (mean_x - mean_y).square().sum() + a.square().sum() + b.square().sum() - 2 * trace_sqrt
    return float(distance)
