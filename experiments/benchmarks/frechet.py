"""Benchmark: the Fréchet distance through symmetric eigen-decompositions vs scipy.linalg.sqrtm.

    python -m experiments.benchmarks.frechet [--dim 2048] [--samples 5000] [--repeats 3]

Fits two Gaussians to random features of Inception's width (different means and covariances,
as a real and a generated set would have), then times, in one run and on the CPU:
  eigh    `evaluation.statistics.frechet_distance` (eigh of sigma1, eigvalsh of S sigma2 S);
  sqrtm   the textbook formula with scipy.linalg.sqrtm(sigma1 @ sigma2), as pytorch-fid does;
and prints both values and their difference. Each is timed as the best of `--repeats` calls.
Then, for `--few` generated images against as many real ones (fewer than the dimensions, as in
one half-sample of a small evaluation's FID interval), it times the distance through the
covariances (`frechet_distance`) and through the SVD of the N x N cross-product of the centred
samples (`frechet_distance_of_samples`, what the interval uses), which give the same value.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import scipy
import scipy.linalg
import torch

from evaluation.statistics import FeatureStatistics, frechet_distance, frechet_distance_of_samples


def frechet_distance_sqrtm(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The reference formula; `.real` drops the imaginary round-off sqrtm returns."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * covmean))


def best_time(function: Callable[[], float], repeats: int) -> tuple[float, float]:
    """(best seconds, value) over `repeats` calls: the least disturbed by other processes."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        value = function()
        best = min(best, time.perf_counter() - start)
    return best, value


def random_statistics(rng: np.random.Generator, samples: int, dim: int, shift: float) -> FeatureStatistics:
    mixing = rng.standard_normal((dim, dim)) / np.sqrt(dim)
    features = rng.standard_normal((samples, dim)) @ mixing + shift
    return FeatureStatistics().update(features)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--few", type=int, default=200, help="images per set in the half-sample case")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    real = random_statistics(rng, args.samples, args.dim, shift=0.0)
    fake = random_statistics(rng, args.samples, args.dim, shift=0.1)
    inputs = (real.mean, real.covariance, fake.mean, fake.covariance)

    print(
        f"d={args.dim}, {args.samples} samples per set, {torch.get_num_threads()} torch threads,"
        f" numpy {np.__version__}, scipy {scipy.__version__}, torch {torch.__version__}"
    )
    eigh_seconds, eigh_value = best_time(lambda: frechet_distance(*inputs), args.repeats)
    sqrtm_seconds, sqrtm_value = best_time(lambda: frechet_distance_sqrtm(*inputs), args.repeats)
    print(f"eigh   {eigh_seconds:7.2f} s   FD = {eigh_value:.10f}")
    print(f"sqrtm  {sqrtm_seconds:7.2f} s   FD = {sqrtm_value:.10f}")
    difference = eigh_value - sqrtm_value
    print(
        f"speed-up {sqrtm_seconds / eigh_seconds:.1f}x, difference {difference:.3e}"
        f" (relative {abs(difference) / abs(sqrtm_value):.3e})"
    )

    few_real = rng.standard_normal((args.few, args.dim))
    few = rng.standard_normal((args.few, args.dim)) + 0.1
    real_stats, few_stats = FeatureStatistics().update(few_real), FeatureStatistics().update(few)
    full_seconds, full_value = best_time(
        lambda: frechet_distance(
            real_stats.mean, real_stats.covariance, few_stats.mean, few_stats.covariance
        ),
        args.repeats,
    )
    gram_seconds, gram_value = best_time(lambda: frechet_distance_of_samples(few_real, few), args.repeats)
    print(f"{args.few} real and {args.few} generated images (one half-sample of an interval):")
    print(f"covariance route {full_seconds:7.3f} s   FD = {full_value:.10f}")
    print(f"SVD route        {gram_seconds:7.3f} s   FD = {gram_value:.10f}")
    relative = abs(gram_value - full_value) / full_value
    print(f"speed-up {full_seconds / gram_seconds:.1f}x, relative difference {relative:.3e}")


if __name__ == "__main__":
    main()
