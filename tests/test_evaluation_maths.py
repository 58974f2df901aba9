"""The evaluation maths against independent references: scipy's sqrtm, numpy's mean/cov,
torch-fidelity's KID and pytorch-msssim called directly."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from pytorch_msssim import ms_ssim
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

from evaluation.bootstrap import bootstrap_ci, bootstrap_intervals
from evaluation.kid import kernel_inception_distance, kid_bootstrap_ci, polynomial_mmd2
from evaluation.ms_ssim import cross_prompt_diversity, intra_prompt_diversity, ms_ssim_pairs, to_grayscale
from evaluation.statistics import FeatureStatistics, frechet_distance, frechet_distance_of_samples

pytestmark = pytest.mark.slow


def sqrtm_frechet(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2)).real)


def gaussian_features(rng: np.random.Generator, samples: int, dim: int, shift: float) -> np.ndarray:
    mixing = rng.standard_normal((dim, dim)) / np.sqrt(dim)
    return rng.standard_normal((samples, dim)) @ mixing + shift


# --- Fréchet distance -----------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [512, 2048])
def test_frechet_distance_matches_sqrtm_reference(dim: int) -> None:
    rng = np.random.default_rng(dim)
    a, b = gaussian_features(rng, 3000, dim, 0.0), gaussian_features(rng, 3000, dim, 0.05)
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    expected = sqrtm_frechet(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("samples", [60, 300, 600])
def test_frechet_distance_of_samples_matches_sqrtm_reference(samples: int) -> None:
    # Fewer samples than dimensions on one or both sides (the SVD route), and more (the covariance route).
    rng = np.random.default_rng(samples)
    for real in (gaussian_features(rng, 3000, 512, 0.0), gaussian_features(rng, 200, 512, 0.0)):
        fake = gaussian_features(rng, samples, 512, 0.1)
        mu1, s1 = real.mean(0), np.cov(real, rowvar=False)
        expected = sqrtm_frechet(mu1, s1, fake.mean(0), np.cov(fake, rowvar=False))
        assert frechet_distance_of_samples(real, fake) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_closed_form_for_diagonal_covariances() -> None:
    """Diagonal covariances, one of them singular: FD = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2."""
    var1, var2 = np.array([1.0, 4.0, 0.0, 2.0]), np.array([9.0, 1.0, 3.0, 0.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, abs=1e-12)


def test_frechet_distance_is_symmetric_and_zero_on_identical_statistics() -> None:
    rng = np.random.default_rng(0)
    a, b = gaussian_features(rng, 500, 64, 0.0), gaussian_features(rng, 500, 64, 0.3)
    stats_a = (torch.from_numpy(a.mean(0)), torch.from_numpy(np.cov(a, rowvar=False)))
    stats_b = (b.mean(0), np.cov(b, rowvar=False))
    assert frechet_distance(*stats_a, *stats_b) == pytest.approx(
        frechet_distance(*stats_b, *stats_a), rel=1e-9
    )
    assert abs(frechet_distance(*stats_a, *stats_a)) < 1e-9


def test_frechet_distance_rejects_bad_inputs() -> None:
    mu, sigma = np.zeros(3), np.eye(3)
    with pytest.raises(ValueError, match="sigma2 must be 3 x 3"):
        frechet_distance(mu, sigma, mu, np.eye(4))
    with pytest.raises(ValueError, match="mu2 must be a vector of length 3"):
        frechet_distance(mu, sigma, np.zeros(4), sigma)
    with pytest.raises(ValueError, match="sigma1 contains NaN"):
        frechet_distance(mu, np.full((3, 3), np.nan), mu, sigma)


# --- streamed statistics --------------------------------------------------------------------------


def test_streamed_statistics_equal_numpy_over_the_concatenation() -> None:
    rng = np.random.default_rng(1)
    # A large common offset is where sum / sum-of-squares accumulation loses digits.
    batches = [rng.standard_normal((size, 16)) * 0.01 + 1e4 for size in (7, 1, 32, 5, 64)]
    stats = FeatureStatistics()
    for batch in batches:
        stats.update(torch.from_numpy(batch) if len(batch) % 2 else batch)
    everything = np.concatenate(batches)
    assert stats.n == len(everything)
    np.testing.assert_allclose(stats.mean, everything.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.covariance, np.cov(everything, rowvar=False), rtol=1e-8, atol=1e-14)


def test_merged_ranks_equal_one_stream(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    features = rng.standard_normal((300, 8)) + np.arange(8)
    ranks = []
    for shard in np.array_split(features, 3):
        rank = FeatureStatistics()
        for batch in np.array_split(shard, 4):
            rank.update(torch.from_numpy(batch).float())
        ranks.append(rank)
    ranks[1].save(tmp_path / "rank1.npz")  # a merge must also work after a round trip through disk
    merged = ranks[0].merge(FeatureStatistics.load(tmp_path / "rank1.npz")).merge(ranks[2])
    reference = features.astype(np.float32).astype(np.float64)
    assert merged.n == 300
    np.testing.assert_allclose(merged.mean, reference.mean(0), rtol=1e-12)
    np.testing.assert_allclose(merged.covariance, np.cov(reference, rowvar=False), rtol=1e-10, atol=1e-13)


def test_save_is_atomic_and_load_round_trips(tmp_path: Path) -> None:
    stats = FeatureStatistics().update(np.random.default_rng(3).standard_normal((50, 4)))
    path = tmp_path / "cache" / "real.npz"
    stats.save(path)
    stats.save(path)  # overwriting replaces the file whole
    assert [p.name for p in path.parent.iterdir()] == ["real.npz"]
    loaded = FeatureStatistics.load(path)
    assert loaded.n == 50
    np.testing.assert_array_equal(loaded.mean, stats.mean)
    np.testing.assert_array_equal(loaded.covariance, stats.covariance)


def test_statistics_reject_bad_inputs() -> None:
    stats = FeatureStatistics().update(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        _ = stats.covariance
    with pytest.raises(ValueError, match="dimension 4"):
        stats.update(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="NaN"):
        stats.update(np.full((2, 3), np.nan))
    with pytest.raises(ValueError, match=r"\[batch, dim\]"):
        stats.update(np.zeros(3))


# --- KID ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("subset_size, seed", [(100, 0), (50, 2020)])
def test_kid_equals_torch_fidelity(subset_size: int, seed: int) -> None:
    rng = np.random.default_rng(4)
    real, fake = gaussian_features(rng, 300, 64, 0.0), gaussian_features(rng, 250, 64, 0.2)
    ours = kernel_inception_distance(
        real, torch.from_numpy(fake), subsets=20, subset_size=subset_size, seed=seed
    )
    theirs = kid_features_to_metric(
        torch.from_numpy(real),
        torch.from_numpy(fake),
        kid_subsets=20,
        kid_subset_size=subset_size,
        rng_seed=seed,
        verbose=False,
    )
    assert ours[0] == pytest.approx(theirs[KEY_METRIC_KID_MEAN], rel=1e-9, abs=1e-12)
    assert ours[1] == pytest.approx(theirs[KEY_METRIC_KID_STD], rel=1e-9, abs=1e-12)
    assert ours[0] > 0


def test_kid_lowers_the_subset_size_to_the_smaller_set(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(5)
    real, fake = rng.standard_normal((40, 16)), rng.standard_normal((30, 16))
    with caplog.at_level(logging.WARNING, logger="evaluation.kid"):
        ours = kernel_inception_distance(real, fake, subsets=5, subset_size=1000)
    assert "lowered to 30" in caplog.text
    theirs = kid_features_to_metric(
        torch.from_numpy(real),
        torch.from_numpy(fake),
        kid_subsets=5,
        kid_subset_size=30,
        rng_seed=0,
        verbose=False,
    )
    assert ours[0] == pytest.approx(theirs[KEY_METRIC_KID_MEAN], rel=1e-9, abs=1e-12)


# --- MS-SSIM --------------------------------------------------------------------------------------


def smooth_images(generator: torch.Generator, count: int, size: int = 176) -> torch.Tensor:
    """Blurry random images in [0, 1]: structured enough for MS-SSIM to be far from 0 and 1."""
    coarse = torch.rand(count, 1, 12, 12, generator=generator)
    fine = torch.rand(count, 1, size, size, generator=generator)
    images = 0.8 * F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False) + 0.2 * fine
    return images.clamp(0, 1)


def test_ms_ssim_pairs_equal_pytorch_msssim_and_one_on_identical_images() -> None:
    generator = torch.Generator().manual_seed(6)
    a, b = smooth_images(generator, 5), smooth_images(generator, 5)
    expected = ms_ssim(a, b, data_range=1.0, size_average=False)
    torch.testing.assert_close(ms_ssim_pairs(a, b, batch_size=2), expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(ms_ssim_pairs(a, a), torch.ones(5), rtol=0, atol=1e-6)


def test_ms_ssim_says_which_resolution_it_needs() -> None:
    images = torch.rand(2, 1, 160, 256)
    with pytest.raises(ValueError, match="at least 161 px.*160x256"):
        ms_ssim_pairs(images, images)


def test_to_grayscale_accepts_uint8_and_rgb_and_rejects_minus_one_to_one() -> None:
    rgb = torch.tensor([255, 0, 0], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    torch.testing.assert_close(to_grayscale(rgb), torch.full((1, 1, 2, 2), 0.299))
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        to_grayscale(torch.full((1, 1, 2, 2), -1.0))


def test_intra_prompt_diversity_follows_roentgen_protocol() -> None:
    generator = torch.Generator().manual_seed(7)
    groups = [smooth_images(generator, 4) for _ in range(3)]
    expected = [
        np.mean(
            [
                ms_ssim(g[i : i + 1], g[j : j + 1], data_range=1.0).item()
                for i, j in itertools.combinations(range(4), 2)
            ]
        )
        for g in groups
    ]
    result = intra_prompt_diversity(groups)
    assert result["prompts"] == 3 and result["pairs"] == 18
    assert result["ms_ssim"] == pytest.approx(np.mean(expected), abs=1e-4)
    assert 0 < result["ms_ssim"] < 0.99

    identical = intra_prompt_diversity([groups[0][:1].expand(4, 3, -1, -1)])  # RGB copies of one image
    assert identical["ms_ssim"] == pytest.approx(1.0, abs=1e-6)
    assert identical["pairs"] == 6


def test_cross_prompt_diversity_pairs_only_different_prompts_and_is_seeded() -> None:
    generator = torch.Generator().manual_seed(8)
    first, second = smooth_images(generator, 2)
    groups = [first.expand(3, -1, -1, -1), second.expand(2, -1, -1, -1)]  # each prompt: copies of one image
    result = cross_prompt_diversity(groups, pairs=10, seed=1, batch_size=4)
    expected = ms_ssim(first[None], second[None], data_range=1.0).item()
    assert result == {"ms_ssim": pytest.approx(expected, abs=1e-4), "pairs": 10, "prompts": 2}

    many = [smooth_images(generator, 4) for _ in range(5)]
    assert cross_prompt_diversity(many, pairs=12, seed=3) == cross_prompt_diversity(many, pairs=12, seed=3)
    assert cross_prompt_diversity(many, pairs=12, seed=3) != cross_prompt_diversity(many, pairs=12, seed=4)


# --- bootstrap ------------------------------------------------------------------------------------


def test_bootstrap_ci_covers_the_true_mean_and_is_reproducible() -> None:
    samples = np.random.default_rng(9).normal(loc=2.0, scale=1.0, size=1000)

    def mean_of(indices: np.ndarray) -> float:
        return float(samples[indices].mean())

    low, high = bootstrap_ci(mean_of, len(samples), resamples=500, seed=0)
    assert low < 2.0 < high
    # Percentile interval of the mean ~ mean +- 1.96 sigma / sqrt(n).
    assert high - low == pytest.approx(2 * 1.96 / np.sqrt(1000), rel=0.15)
    assert bootstrap_ci(mean_of, len(samples), resamples=500, seed=0) == (low, high)
    assert bootstrap_ci(mean_of, len(samples), resamples=500, seed=1) != (low, high)


def test_bootstrap_intervals_leave_out_undefined_resamples() -> None:
    flags = np.array([1.0] + [0.0] * 9)

    def scores(indices: np.ndarray) -> dict[str, float]:
        # "share" is always defined; "ratio" only when the resample drew the one flagged sample
        # (probability 1 - 0.9^10 = 0.65) and "rare" only when it drew it 3+ times (about 0.07).
        hits = flags[indices].sum()
        return {"share": hits / 10, "ratio": 1.0 if hits else np.nan, "rare": 1.0 if hits >= 3 else np.nan}

    intervals = bootstrap_intervals(scores, 10, resamples=400, seed=0)
    assert intervals["share"][0] == 0.0 and 0.2 <= intervals["share"][1] <= 0.4
    assert intervals["ratio"] == (1.0, 1.0)
    assert intervals["rare"] == (None, None)


def test_kid_bootstrap_resample_scores_are_the_distinct_pair_mmd() -> None:
    """Each resample's score is the unbiased MMD^2 over pairs of distinct generated samples,
    computed here directly from the kernel on the resampled rows."""
    rng = np.random.default_rng(11)
    real, fake = gaussian_features(rng, 12, 4, 0.0), gaussian_features(rng, 12, 4, 0.4)

    def kernel(a, b):
        return (a @ b.T / 4 + 1) ** 3

    def direct(indices: np.ndarray) -> float:
        k_ff = kernel(fake[indices], fake[indices])
        distinct = indices[:, None] != indices[None, :]
        k_rr = kernel(real, real)
        real_term = (k_rr.sum() - np.trace(k_rr)) / (12 * 11)
        return real_term + k_ff[distinct].mean() - 2 * kernel(real, fake[indices]).mean()

    draws = np.random.default_rng(0).integers(12, size=(50, 12))  # what bootstrap_ci draws with seed 0
    expected = np.quantile([direct(d) for d in draws], [0.025, 0.975])
    assert kid_bootstrap_ci(real, fake, resamples=50, seed=0) == pytest.approx(tuple(expected), rel=1e-9)
    # The direct reference itself: with every sample once it is the unbiased MMD^2 that KID
    # averages over subsets (checked against torch-fidelity above).
    assert direct(np.arange(12)) == pytest.approx(polynomial_mmd2(real, fake, 3, 1 / 4, 1.0), rel=1e-12)
