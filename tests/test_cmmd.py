"""CMMD (evaluation.cmmd) against the estimator of the authors' reference implementation
(google-research cmmd/distance.py: biased MMD^2, Gaussian RBF kernel, sigma 10, scale 1000),
written out here with explicit double loops."""

import math

import numpy as np
import pytest
import torch

import evaluation.cmmd as cmmd_module
from evaluation.cmmd import cmmd


def cmmd_by_loops(x: np.ndarray, y: np.ndarray, sigma: float, scale: float) -> float:
    """scale * (mean k(x_i, x_i') + mean k(y_j, y_j') - 2 mean k(x_i, y_j)), all pairs incl. i = i'."""

    def k(a, b):
        squared = sum((float(p) - float(q)) ** 2 for p, q in zip(a, b, strict=True))
        return math.exp(-squared / (2 * sigma**2))

    def mean_kernel(a, b):
        return math.fsum(k(a[i], b[j]) for i in range(len(a)) for j in range(len(b))) / (len(a) * len(b))

    return scale * (mean_kernel(x, x) + mean_kernel(y, y) - 2 * mean_kernel(x, y))


X = np.array([[0.1, -0.3, 0.5], [1.2, 0.4, -0.7], [-0.6, 0.9, 0.2], [0.3, 0.3, 0.3], [2.0, -1.0, 0.0]])
Y = np.array([[0.5, 0.1, -0.2], [1.5, -0.8, 0.9], [-1.1, 0.2, 0.6], [0.0, 2.2, -0.4]])


@pytest.mark.parametrize(("sigma", "scale"), [(10.0, 1000.0), (1.5, 1.0), (0.7, 3.0)])
def test_equals_the_reference_formula_by_double_loops(sigma, scale):
    expected = cmmd_by_loops(X, Y, sigma, scale)
    assert expected > 0
    assert cmmd(X, Y, sigma=sigma, scale=scale) == pytest.approx(expected, rel=1e-12)


def test_defaults_are_the_reference_sigma_10_and_scale_1000():
    assert cmmd(X, Y) == pytest.approx(cmmd_by_loops(X, Y, 10.0, 1000.0), rel=1e-12)
    # A different bandwidth gives a clearly different number, so the test above can tell them apart.
    assert abs(cmmd(X, Y, sigma=5.0) - cmmd(X, Y)) > 1e-3 * cmmd(X, Y)


def test_identical_sets_give_zero_as_the_biased_estimator_does():
    # With the diagonal terms included the three kernel means coincide for identical sets.
    assert cmmd(X, X) == 0.0
    assert cmmd(X, X.copy()) == 0.0
    permuted = X[[3, 1, 4, 0, 2]]
    assert abs(cmmd(X, permuted)) < 1e-12  # only the summation order differs
    assert cmmd_by_loops(X, X, 10.0, 1000.0) == pytest.approx(0.0, abs=1e-12)


def test_grows_with_a_mean_shift():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(60, 8))
    fake = rng.normal(size=(50, 8))
    direction = np.ones(8) / math.sqrt(8)
    values = [cmmd(real, fake + shift * direction) for shift in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert all(a < b for a, b in zip(values, values[1:], strict=False)), values
    assert values[0] > 0  # two finite samples of one distribution: small but positive (biased estimate)


def test_symmetric_and_accepts_torch_float32():
    assert cmmd(X, Y) == pytest.approx(cmmd(Y, X), rel=1e-12)
    from_torch = cmmd(torch.tensor(X, dtype=torch.float32), torch.tensor(Y, dtype=torch.float32))
    assert from_torch == pytest.approx(cmmd(X.astype(np.float32), Y.astype(np.float32)), rel=1e-12)


def test_blocked_sums_equal_the_unblocked_ones(monkeypatch):
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(23, 5)), rng.normal(size=(17, 5)) + 0.2
    whole = cmmd(real, fake, sigma=2.0)
    monkeypatch.setattr(cmmd_module, "BLOCK", 4)  # 23 and 17 rows: ragged last blocks
    assert cmmd(real, fake, sigma=2.0) == pytest.approx(whole, rel=1e-12)
    assert cmmd(real, fake, sigma=2.0) == pytest.approx(cmmd_by_loops(real, fake, 2.0, 1000.0), rel=1e-12)


@pytest.mark.parametrize(
    ("real", "fake", "sigma", "message"),
    [
        (np.zeros(3), Y, 10.0, "2-D"),
        (X, np.zeros((4, 2)), 10.0, "dimensions differ"),
        (np.zeros((0, 3)), Y, 10.0, "empty"),
        (X, np.full((4, 3), np.nan), 10.0, "NaN"),
        (X, Y, 0.0, "sigma must be positive"),
    ],
)
def test_invalid_inputs_are_rejected(real, fake, sigma, message):
    with pytest.raises(ValueError, match=message):
        cmmd(real, fake, sigma=sigma)
