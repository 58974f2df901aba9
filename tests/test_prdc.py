"""Precision / recall / density / coverage (evaluation.prdc) against hand-computed values and an
independent implementation of the four formulas of Naeem et al. (2020)."""

import numpy as np
import pytest
import torch

from evaluation.prdc import precision_recall_density_coverage


def test_hand_computed_one_dimensional_example():
    # k = 1, real X = {0, 1, 3, 6}, fake Y = {0.5, 1.5, 20, 21} on a line.
    # Nearest-neighbour radii within each set:
    #   real: r(0) = 1, r(1) = 1, r(3) = 2, r(6) = 3   -> balls (-1, 1), (0, 2), (1, 5), (3, 9)
    #   fake: r(0.5) = 1, r(1.5) = 1, r(20) = 1, r(21) = 1
    # No distance equals a radius, so open and closed balls agree.
    # Real balls holding each fake: 0.5 -> {B(0), B(1)} = 2; 1.5 -> {B(1), B(3)} = 2; 20, 21 -> 0.
    #   precision = 2 of 4 fakes in some real ball = 0.5
    #   density   = (2 + 2 + 0 + 0) / (k * M) = 4 / 4 = 1.0
    # Fake balls holding each real: 0 (|0 - 0.5| = 0.5 < 1) yes; 1 (0.5 from both) yes;
    #   3 (nearest fake 1.5 away, radius 1) no; 6 no          -> recall = 2 / 4 = 0.5
    # Nearest fake of each real within its own radius: 0 (0.5 < 1) yes, 1 (0.5 < 1) yes,
    #   3 (1.5 < 2) yes, 6 (4.5 < 3) no                      -> coverage = 3 / 4 = 0.75
    real = np.array([[0.0], [1.0], [3.0], [6.0]])
    fake = np.array([[0.5], [1.5], [20.0], [21.0]])
    values = precision_recall_density_coverage(real, fake, k=1)
    expected = {"precision": 0.5, "recall": 0.5, "density": 1.0, "coverage": 0.75}
    assert set(values) == set(expected)
    for name, value in expected.items():
        assert values[name] == pytest.approx(value, abs=1e-9), name
        assert isinstance(values[name], float)


def test_hand_computed_two_dimensional_example_with_k_2():
    # k = 2, real = corners of the unit square plus (5, 0); fake = (0.5, 0.5), (0.5, 1.5), (5, 1), (9, 9).
    # Real radii (2nd nearest other real): the four corners have neighbours at 1, 1, sqrt 2 -> r = 1;
    #   (5, 0): distances 4 (to (1, 0)), sqrt 17 (to (1, 1)), 5, sqrt 26 -> r = sqrt 17 ~ 4.123.
    # Fake pairwise distances: a=(0.5,0.5), b=(0.5,1.5), c=(5,1), d=(9,9):
    #   ab = 1, ac = sqrt(20.5) ~ 4.528, ad = sqrt(144.5) ~ 12.02, bc = sqrt(20.5) ~ 4.528,
    #   bd = sqrt(128.5) ~ 11.34, cd = sqrt(80) ~ 8.944
    #   radii (2nd smallest of the three): a -> 4.528, b -> 4.528, c -> 4.528, d -> 11.34
    # Real balls holding each fake (corner balls have radius 1):
    #   a: sqrt(0.5) ~ 0.707 < 1 from all four corners; 4.528 > 4.123 from (5, 0) -> 4
    #   b: from (0,1) and (1,1) sqrt(0.5) < 1; from (0,0), (1,0) sqrt(2.5) > 1; from (5,0) sqrt(22.5) > r -> 2
    #   c: from (5, 0) 1 < 4.123 -> 1 (corners are >= 4 away)
    #   d: none -> 0
    #   precision = 3 / 4 = 0.75; density = (4 + 2 + 1 + 0) / (2 * 4) = 0.875
    # Recall: each real inside some fake ball? corners are within 0.71 of a (radius 4.528); (5, 0) is
    #   1 from c (radius 4.528) -> recall = 5 / 5 = 1.0. The one tie, (5, 0) at exactly sqrt 20.5 from
    #   a (a's radius), does not matter: (5, 0) is inside c's ball anyway.
    # Coverage: nearest fake of each corner is a at 0.707 < 1; of (5, 0) is c at 1 < 4.123 -> 1.0
    real = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [5.0, 0.0]])
    fake = np.array([[0.5, 0.5], [0.5, 1.5], [5.0, 1.0], [9.0, 9.0]])
    values = precision_recall_density_coverage(real, fake, k=2)
    expected = {"precision": 0.75, "recall": 1.0, "density": 0.875, "coverage": 1.0}
    for name, value in expected.items():
        assert values[name] == pytest.approx(value, abs=1e-9), name


def test_a_sample_exactly_on_a_radius_is_outside_the_ball():
    # k = 1, real {0, 1, 2}: every radius is exactly 1. Fake {3, 10, 11}: 3 is at distance exactly 1
    # from the real 2, so with prdc's strict inequality it lies in no real ball.
    values = precision_recall_density_coverage(
        np.array([[0.0], [1.0], [2.0]]), np.array([[3.0], [10.0], [11.0]]), 1
    )
    assert values["precision"] == 0.0 and values["density"] == 0.0 and values["coverage"] == 0.0
    # The fake 3 has radius 7 (to 10): it holds 0, 1 and 2 (distances 3, 2, 1 < 7).
    assert values["recall"] == 1.0


def naive_prdc(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    """The four formulas of Naeem et al. (2020), written out with broadcasting and loops."""
    n, m = len(real), len(fake)

    def distances(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=-1))

    def knn_radii(a):
        d = distances(a, a)
        # k-th nearest other sample: sorted row, index 0 is the sample itself (distance 0).
        return np.array([np.sort(np.delete(d[i], i))[k - 1] for i in range(len(a))])

    real_radii, fake_radii = knn_radii(real), knn_radii(fake)
    cross = distances(real, fake)  # [n, m]
    precision = sum(any(cross[i, j] < real_radii[i] for i in range(n)) for j in range(m)) / m
    recall = sum(any(cross[i, j] < fake_radii[j] for j in range(m)) for i in range(n)) / n
    density = sum(cross[i, j] < real_radii[i] for i in range(n) for j in range(m)) / (k * m)
    coverage = sum(cross[i].min() < real_radii[i] for i in range(n)) / n
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


@pytest.mark.parametrize(("k", "shift", "scale"), [(5, 0.0, 1.0), (5, 0.7, 1.3), (3, 1.5, 0.6)])
def test_random_gaussian_features_match_an_independent_implementation(k, shift, scale):
    rng = np.random.default_rng(k)
    real = rng.normal(size=(80, 6))
    fake = rng.normal(size=(64, 6)) * scale + shift
    values = precision_recall_density_coverage(real, fake, k=k)
    expected = naive_prdc(real, fake, k)
    for name in expected:
        assert values[name] == pytest.approx(expected[name], abs=1e-9), name
    if shift > 0:  # the example is not degenerate: a shifted fake set misses part of the real manifold
        assert values["precision"] < 1 and values["coverage"] < 1


def test_torch_inputs_and_float32_give_the_same_values():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(30, 4)), rng.normal(size=(25, 4)) + 0.3
    from_numpy = precision_recall_density_coverage(real, fake)
    from_torch = precision_recall_density_coverage(torch.from_numpy(real), torch.from_numpy(fake))
    assert from_numpy == from_torch


@pytest.mark.parametrize(
    ("real", "fake", "k", "message"),
    [
        (np.zeros(10), np.zeros((10, 2)), 5, "2-D"),
        (np.zeros((10, 2)), np.zeros((10, 3)), 5, "dimensions differ"),
        (np.full((10, 2), np.nan), np.zeros((10, 2)), 5, "NaN"),
        (np.zeros((10, 2)), np.full((10, 2), np.inf), 5, "infinite"),
        (np.zeros((6, 2)), np.zeros((10, 2)), 5, "at least k \\+ 2 = 7 real"),
        (np.zeros((10, 2)), np.zeros((3, 2)), 2, "at least k \\+ 2 = 4 fake"),
        (np.zeros((10, 2)), np.zeros((10, 2)), 0, "positive integer"),
        (np.zeros((10, 2)), np.zeros((10, 2)), 2.0, "positive integer"),
    ],
)
def test_invalid_inputs_are_rejected_with_clear_errors(real, fake, k, message):
    with pytest.raises(ValueError, match=message):
        precision_recall_density_coverage(real, fake, k=k)
