"""The data-copying test on simulated features with known answers: fresh samples and a narrower
generator copy nothing and must not be flagged (and the test must hold its level), near-copies of
training rows must be flagged; the nearest-neighbour table must match a brute-force search."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from evaluation.copying import (
    LABEL_HEIGHT,
    closest_pairs,
    data_copying,
    nearest_neighbours,
    permutation_test,
    write_closest_pairs,
)

D, N_TRAIN, N_HELDOUT, M = 64, 2000, 500, 500


@pytest.fixture(scope="module")
def real():
    rng = np.random.default_rng(0)
    return rng.standard_normal((N_TRAIN, D)), rng.standard_normal((N_HELDOUT, D))


def test_fresh_samples_are_not_flagged(real):
    train, heldout = real
    generated = np.random.default_rng(1).standard_normal((M, D))
    report, table = data_copying(train, heldout, generated)
    assert report["p_value"] > 0.01 and not report["copying_detected"]
    assert report["expected"] == pytest.approx(N_TRAIN / (N_TRAIN + N_HELDOUT))
    assert report["excess"] == pytest.approx(report["statistic"] - report["expected"])
    assert report["statistic"] == pytest.approx(table["nearest_is_train"].mean())
    assert (report["n_train"], report["n_heldout"], report["n_generated"]) == (N_TRAIN, N_HELDOUT, M)
    assert report["permutations"] == 2000 and report["metric"] == "euclidean"
    assert "Meehan" in report["method"]


def test_narrower_generator_is_not_flagged(real):
    """Shrunk samples lie nearer to every real image, training and held-out alike: not copying."""
    train, heldout = real
    generated = 0.5 * np.random.default_rng(2).standard_normal((M, D))
    for metric in ("euclidean", "cosine"):
        report, _ = data_copying(train, heldout, generated, metric=metric)
        assert report["p_value"] > 0.01, (metric, report)


def test_near_copies_are_flagged(real):
    train, heldout = real
    rng = np.random.default_rng(3)
    generated = train[rng.integers(0, N_TRAIN, M)] + 0.3 * rng.standard_normal((M, D))
    for metric in ("euclidean", "cosine"):
        report, _ = data_copying(train, heldout, generated, metric=metric)
        assert report["p_value"] < 0.01 and report["copying_detected"], (metric, report)
        assert report["p_value"] == pytest.approx(1 / 2001)
        assert report["statistic"] == 1.0


@pytest.mark.parametrize("clustered", [False, True])
def test_level_holds(clustered):
    """Rejection rate at alpha = 0.05 over 50 null data sets. Clustered: four images per prompt near
    one fresh point, so images share nearest neighbours, as a naive binomial test would ignore."""
    rng = np.random.default_rng(4)
    rejections = 0
    for _ in range(50):
        train, heldout = rng.standard_normal((400, 16)), rng.standard_normal((100, 16))
        if clustered:
            centres = rng.standard_normal((25, 16))
            generated = np.repeat(centres, 4, axis=0) + 0.1 * rng.standard_normal((100, 16))
        else:
            generated = rng.standard_normal((100, 16))
        groups = np.repeat(np.arange(25), 4)
        report, _ = data_copying(train, heldout, generated, groups, permutations=200, alpha=0.05, seed=5)
        rejections += report["copying_detected"]
    assert rejections / 50 <= 0.12


def test_permutation_null_matches_relabelling():
    """Each permutation is the statistic after relabelling a random n_H-subset of R as held-out: its
    null mean is n_T / (n_T + n_H) and its spread widens when generated images share neighbours."""
    n_train, n_heldout = 30, 10
    rng = np.random.default_rng(6)
    table = nearest_neighbours(
        rng.standard_normal((n_train, 4)), rng.standard_normal((n_heldout, 4)), rng.standard_normal((200, 4))
    )
    report = permutation_test(table, n_train, n_heldout, permutations=4000, seed=7)
    # Brute force: relabel whole pooled sets and recompute the share.
    neighbour = np.where(table["nearest_is_train"], table["train_index"], n_train + table["heldout_index"])
    shares = []
    for _ in range(4000):
        is_train = np.zeros(n_train + n_heldout, bool)
        is_train[rng.permutation(n_train + n_heldout)[:n_train]] = True
        shares.append(is_train[neighbour].mean())
    assert report["null_sd"] == pytest.approx(np.std(shares), rel=0.1)
    assert report["distinct_neighbours"] == len(np.unique(neighbour))
    p_brute = (1 + np.sum(np.array(shares) >= report["statistic"])) / 4001
    assert report["p_value"] == pytest.approx(p_brute, abs=0.03)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_table_matches_brute_force(metric):
    rng = np.random.default_rng(8)
    train, heldout = rng.standard_normal((53, 8)), rng.standard_normal((17, 8))
    generated = rng.standard_normal((29, 8)).astype(np.float32)
    groups = np.arange(29) // 4
    # A small block exercises the block edges of the scan.
    table = nearest_neighbours(train, heldout, generated, groups, metric=metric, block_size=7)

    def brute(queries, reference):
        if metric == "cosine":
            q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
            r = reference / np.linalg.norm(reference, axis=1, keepdims=True)
            distance = 1 - q @ r.T
        else:
            distance = np.linalg.norm(queries[:, None].astype(np.float64) - reference[None], axis=2)
        return distance.argmin(axis=1), distance.min(axis=1)

    train_index, train_distance = brute(generated, train)
    heldout_index, heldout_distance = brute(generated, heldout)
    np.testing.assert_array_equal(table["train_index"], train_index)
    np.testing.assert_array_equal(table["heldout_index"], heldout_index)
    np.testing.assert_allclose(table["train_distance"], train_distance, rtol=1e-6)
    np.testing.assert_allclose(table["heldout_distance"], heldout_distance, rtol=1e-6)
    np.testing.assert_allclose(table["ratio"], train_distance / heldout_distance, rtol=1e-6)
    np.testing.assert_array_equal(table["nearest_is_train"], train_distance < heldout_distance)
    np.testing.assert_array_equal(table["generated"], np.arange(29))
    np.testing.assert_array_equal(table["group"], groups)


def test_closest_pairs_are_the_planted_copies_and_the_grid_is_written(real, tmp_path):
    train, heldout = real
    rng = np.random.default_rng(9)
    generated = rng.standard_normal((100, D))
    planted_rows, planted_train = np.array([7, 31, 64]), np.array([1500, 12, 900])
    generated[planted_rows] = train[planted_train] + 0.01 * rng.standard_normal((3, D))
    _, table = data_copying(train, heldout, generated, groups=np.arange(100) // 4, permutations=100)
    pairs = closest_pairs(table, 3)
    assert set(zip(pairs["generated"], pairs["train_index"], strict=True)) == set(
        zip(planted_rows, planted_train, strict=True)
    )
    assert (pairs["ratio"].diff().dropna() >= 0).all()

    def image(value: int, size: tuple[int, int]) -> Image.Image:
        return Image.new("L", size, int(value) % 256)

    generated_images = [image(i, (40, 50)) for i in range(100)]
    train_images = {i: image(3 * i, (64, 64)) for i in planted_train}  # only the pairs' images are read
    path = write_closest_pairs(
        pairs, generated_images, train_images, tmp_path / "grid" / "pairs.png", size=32
    )
    with Image.open(path) as grid:
        assert grid.format == "PNG" and grid.size == (2 * 32, 3 * (32 + LABEL_HEIGHT))
        first = closest_pairs(table, 1).iloc[0]
        assert grid.getpixel((40, 10)) == (3 * int(first["train_index"]) % 256,) * 3
    assert [p.name for p in path.parent.iterdir()] == ["pairs.png"]  # no temporary left behind


def test_input_errors(real):
    train, heldout = real
    generated = np.zeros((5, D)) + 1.0
    with pytest.raises(ValueError, match="different widths"):
        data_copying(train, heldout[:, :10], generated)
    bad = generated.copy()
    bad[2, 3] = np.nan
    with pytest.raises(ValueError, match="generated features hold non-finite values \\(row 2\\)"):
        data_copying(train, heldout, bad)
    with pytest.raises(ValueError, match="heldout features are empty"):
        data_copying(train, heldout[:0], generated)
    with pytest.raises(ValueError, match="2-D"):
        data_copying(train, heldout, generated[0])
    with pytest.raises(ValueError, match="all-zero row"):
        data_copying(train, heldout, np.zeros((5, D)), metric="cosine")
    with pytest.raises(ValueError, match="metric"):
        data_copying(train, heldout, generated, metric="manhattan")
    with pytest.raises(ValueError, match="groups"):
        data_copying(train, heldout, generated, groups=[0, 1])
    with pytest.raises(ValueError, match="alpha"):
        data_copying(train, heldout, generated, alpha=0)
    with pytest.raises(ValueError, match="permutations"):
        data_copying(train, heldout, generated, permutations=0)
