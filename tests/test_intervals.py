"""Simulations with known answers for the evaluation's intervals: an interval that does not cover
what it claims is a wrong result, however plausible it looks."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.bootstrap import bootstrap_ci, fid_interval
from evaluation.statistics import frechet_distance_of_samples

pytestmark = pytest.mark.slow

DIM, N = 64, 500


def two_draws(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Real and generated features drawn independently from one Gaussian: the true FID is 0."""
    return rng.standard_normal((N, DIM)), rng.standard_normal((N, DIM))


def test_fid_interval_contains_its_point_estimate() -> None:
    real, fake = two_draws(np.random.default_rng(0))
    low, high = fid_interval(real, fake, resamples=100, seed=0)
    assert low < frechet_distance_of_samples(real, fake) < high
    assert fid_interval(real, fake, resamples=100, seed=0) == (low, high)


def test_fid_interval_covers_the_mean_fid_of_independent_draws() -> None:
    """The point estimate is FID at this N, small-sample bias included (about 4.4 here, true FID 0):
    its expectation is the mean over independent experiments, which a 95% interval must cover in
    about 95 of 100 repetitions (the acceptance bound is 85)."""
    rng = np.random.default_rng(1)
    expected = np.mean([frechet_distance_of_samples(*two_draws(rng)) for _ in range(200)])
    covered = 0
    for repetition in range(100):
        low, high = fid_interval(*two_draws(rng), resamples=40, seed=repetition)
        covered += low <= expected <= high
    assert covered >= 85


def test_fid_interval_covers_a_nonzero_distance() -> None:
    """Shifted means (true FID 64 x 0.1^2 = 0.64 plus the bias): coverage holds away from 0 too."""
    rng = np.random.default_rng(2)

    def draw() -> tuple[np.ndarray, np.ndarray]:
        real, fake = two_draws(rng)
        return real, fake + 0.1

    expected = np.mean([frechet_distance_of_samples(*draw()) for _ in range(200)])
    covered = sum(low <= expected <= high for low, high in (fid_interval(*draw(), resamples=40, seed=r)
                                                            for r in range(60)))  # fmt: skip
    assert covered >= 51  # 85% of 60


def test_fid_interval_keeps_a_prompts_images_together() -> None:
    rng = np.random.default_rng(3)
    real, fake = two_draws(rng)
    prompts = [list(range(i, i + 4)) for i in range(0, N, 4)]
    assert fid_interval(real, fake, resamples=20, fake_groups=prompts) != fid_interval(
        real, fake, resamples=20
    )
    with pytest.raises(ValueError, match="partition"):
        fid_interval(real, fake, resamples=5, fake_groups=prompts[:-1])
    with pytest.raises(ValueError, match="at least 4"):
        fid_interval(real[:3], fake, resamples=5)


def clustered_outcomes(rng: np.random.Generator, prompts: int, per_prompt: int) -> np.ndarray:
    """Binary outcomes (a detection) of `per_prompt` images per prompt, alike within a prompt:
    each prompt's rate is drawn from Beta(0.5, 0.5) (mean 0.5), its images are Bernoulli(rate)."""
    rates = rng.beta(0.5, 0.5, size=prompts)
    return (rng.random((prompts, per_prompt)) < rates[:, None]).astype(float).ravel()


def test_prompt_bootstrap_covers_a_rate_that_image_bootstrap_misses() -> None:
    """Four images of a prompt are not independent: resampling images gives intervals too narrow
    for the expected rate (0.5), resampling prompts covers it about as often as claimed."""
    rng = np.random.default_rng(4)
    prompts, per_prompt, repetitions = 60, 4, 200
    groups = [list(range(p * per_prompt, (p + 1) * per_prompt)) for p in range(prompts)]
    covered = {"images": 0, "prompts": 0}
    for repetition in range(repetitions):
        outcomes = clustered_outcomes(rng, prompts, per_prompt)

        def rate(indices: np.ndarray, outcomes=outcomes) -> float:
            return float(outcomes[indices].mean())

        for unit, unit_groups in (("images", None), ("prompts", groups)):
            low, high = bootstrap_ci(rate, len(outcomes), 200, seed=repetition, groups=unit_groups)
            covered[unit] += low <= 0.5 <= high
    assert covered["prompts"] >= 0.90 * repetitions
    assert covered["images"] <= 0.85 * repetitions
