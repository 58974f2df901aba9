"""A data-copying test: are generated images nearer to the training images than to held-out real ones?

Data-copying (Meehan, Chaudhuri & Dasgupta 2020, "A Non-Parametric Test to Detect Data-Copying in
Generative Models", AISTATS 2020, PMLR 108) is a model emitting its training images or small
variations of them. Its test compares the generated images with real images the model never saw
(held out): those show how close an image that copies nothing comes to the training set.

Distance-threshold scores (the share of generated images nearer to a training image than most
held-out images are) and Meehan's C_T (per k-means cell, a Mann-Whitney test of generated against
held-out distances to the training set) both read "closer to the training set" as copying. But a
generator that is merely less diverse than the data, its samples shrunk towards the data's mean,
is closer to every real image, training and held-out alike, and both flag it. On features with
D = 64, 2000 training, 500 held-out and 500 generated images, a 0.5 * N(0, I) generator of
N(0, I) data that copies nothing scores a memorisation share of 0.994 and C_T = -12.2.

The test here asks instead, for each generated image, whether its nearest real image (among
training and held-out images pooled, R = T u H) is a training image. If the generator carries no
information about which real images it was trained on (however narrow or broad it is), the
training / held-out labels of R are exchangeable with respect to the generated set: relabelling a
random n_H-subset of R as held-out gives a draw of the statistic under that null. The p-value of
the observed share against those draws is exact conditional on the data (no distributional
assumption, any metric) and accounts for any dependence between generated images, such as the
four images of one prompt that share nearest neighbours. A less diverse generator is nearer to
training and held-out images alike, so its nearest real image is a training image as often as
chance says, and it is not flagged.

Premise: the held-out images are a random split of the same pool as the training images (not,
say, another hospital), and were never used in training. A generator trained on T then resembles
T's distribution no more than H's, so only memory of the particular training images moves the
statistic. Held-out images from a shifted distribution make the test flag the shift.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from datamodules.atomic import write_atomically

from .suite import load_uint8

METHOD = (
    "exchangeability (permutation) test of the share of generated images whose nearest real image "
    "(training and held-out pooled) is a training image; held-out real images as the reference for "
    "a sample that copies nothing, as in Meehan et al. 2020 (AISTATS), but unlike their C_T it does "
    "not flag a generator that is merely less diverse than the data"
)
METRICS = ("euclidean", "cosine")
# Reference and query rows per block of the nearest-neighbour scan: a block's distance matrix is
# BLOCK_SIZE^2 float64 values (32 MiB), however large the training set.
BLOCK_SIZE = 2048
# Height of the two lines of text under each image of the closest-pairs grid, in pixels.
LABEL_HEIGHT = 30


def data_copying(
    train: np.ndarray,
    heldout: np.ndarray,
    generated: np.ndarray,
    groups: Sequence[int] | None = None,
    metric: str = "euclidean",
    permutations: int = 2000,
    alpha: float = 0.01,
    seed: int = 0,
    block_size: int = BLOCK_SIZE,
) -> tuple[dict, pd.DataFrame]:
    """Test generated images for copying of training images; return the report and the per-image table.

    train [n_T, D], heldout [n_H, D], generated [m, D]: features (any embedding, the same for all
    three) of the training images, of real images never used in training, and of the generated
    images. groups: the prompt index of each generated image, carried into the table (the test
    itself needs no grouping: the permutation null holds whatever the dependence between images).
    metric: "euclidean" on the features as given, or "cosine" (features L2-normalised first; the
    table's distances are then 1 - cosine similarity).

    The statistic s is the share of generated images whose nearest real image is a training image;
    with no copying its expected value is n_T / (n_T + n_H). The one-sided p-value is
    (1 + #{permutations with s_perm >= s}) / (1 + permutations) (Phipson & Smyth 2010), each
    permutation relabelling a random n_H-subset of the pooled real images as held-out.

    Power: a generated image that copies a training image can raise s by at most 1 / m, and with no
    copying s is already near n_T / (n_T + n_H), so the largest possible excess (every image a copy)
    is n_H / (n_T + n_H). With m independent images of which a share c are copies, the excess is
    about c * sqrt(m * n_H / n_T) null standard deviations: use every held-out real image available,
    and every training image (a random subset of T also keeps the test exact, but a copy of an image
    left out no longer counts, which costs more than the smaller n_T gains).

    Returns (report, table). report: statistic, expected, excess, max_excess, null_sd, p_value,
    permutations, alpha, copying_detected (p_value < alpha), n_train, n_heldout, n_generated,
    n_groups (None without groups), distinct_neighbours (distinct nearest real images: fewer than
    n_generated when images share neighbours), ties (images as near to a held-out as to a training
    image, decided by a seeded coin), metric, method. table: see `nearest_neighbours`.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    table = nearest_neighbours(train, heldout, generated, groups, metric, block_size, seed)
    report = permutation_test(table, len(train), len(heldout), permutations, seed)
    report.update(
        permutations=permutations,
        alpha=alpha,
        copying_detected=bool(report["p_value"] < alpha),
        n_train=len(train),
        n_heldout=len(heldout),
        n_generated=len(generated),
        n_groups=None if groups is None else int(table["group"].nunique()),
        ties=int((table["train_distance"] == table["heldout_distance"]).sum()),
        metric=metric,
        method=METHOD,
    )
    return report, table


def nearest_neighbours(
    train: np.ndarray,
    heldout: np.ndarray,
    generated: np.ndarray,
    groups: Sequence[int] | None = None,
    metric: str = "euclidean",
    block_size: int = BLOCK_SIZE,
    seed: int = 0,
) -> pd.DataFrame:
    """Each generated image's nearest training and nearest held-out image, one row per generated image.

    Columns: generated (row in `generated`), group (its prompt index, <NA> without groups),
    train_index, train_distance, heldout_index, heldout_distance, ratio (train_distance /
    heldout_distance: below 1 when a training image is nearer; 0 / 0 counts as 1), nearest_is_train.
    An exact tie between the two distances (a held-out image duplicating a training image) is
    decided by a coin seeded with `seed`, so that the choice does not depend on which side is which.

    The search scans the reference sets in blocks of `block_size` rows (float64), so memory stays
    bounded for a training set of any size; the reported distances are recomputed from the
    differences to the chosen neighbours, free of the rounding of |a|^2 - 2 a.b + |b|^2.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    arrays = {"train": train, "heldout": heldout, "generated": generated}
    arrays = {name: _checked(name, x, metric) for name, x in arrays.items()}
    widths = {name: x.shape[1] for name, x in arrays.items()}
    if len(set(widths.values())) > 1:
        raise ValueError(f"features of different widths D: {widths}")
    m = len(arrays["generated"])
    if groups is None:
        group = pd.array([pd.NA] * m, dtype="Int64")
    else:
        group = pd.array(np.asarray(groups), dtype="Int64")
        if len(group) != m:
            raise ValueError(f"{len(group)} groups given for {m} generated images")

    queries = _float64(arrays["generated"], metric)
    train_index, train_distance = _nearest(queries, arrays["train"], metric, block_size)
    heldout_index, heldout_distance = _nearest(queries, arrays["heldout"], metric, block_size)
    tie = train_distance == heldout_distance
    coin = np.random.default_rng(seed).random(m) < 0.5
    nearest_is_train = (train_distance < heldout_distance) | (tie & coin)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(tie, 1.0, train_distance / heldout_distance)
    return pd.DataFrame(
        {
            "generated": np.arange(m),
            "group": group,
            "train_index": train_index,
            "train_distance": train_distance,
            "heldout_index": heldout_index,
            "heldout_distance": heldout_distance,
            "ratio": ratio,
            "nearest_is_train": nearest_is_train,
        }
    )


def permutation_test(
    table: pd.DataFrame, n_train: int, n_heldout: int, permutations: int = 2000, seed: int = 0
) -> dict:
    """The exchangeability test on a `nearest_neighbours` table (see `data_copying`).

    Only the labels of the distinct nearest real images matter, so a permutation draws how many of
    those k images a random n_H-subset of the n_T + n_H real images would hold out (hypergeometric)
    and which of them (a uniform subset), then counts the generated images whose neighbour kept the
    training label: the nearest-neighbour search is done once and each permutation costs O(k).

    Returns statistic, expected, excess, max_excess, null_sd (the permutation draws' standard
    deviation), p_value and distinct_neighbours.
    """
    if permutations < 1:
        raise ValueError(f"permutations must be at least 1, got {permutations}")
    if n_train < 1 or n_heldout < 1:
        raise ValueError(f"need training and held-out images, got n_train={n_train}, n_heldout={n_heldout}")
    if len(table) == 0:
        raise ValueError("no generated images in the table")
    is_train = table["nearest_is_train"].to_numpy(bool)
    # The nearest real image as an index into R = [train; heldout].
    neighbour = np.where(is_train, table["train_index"], n_train + table["heldout_index"].to_numpy())
    _, counts = np.unique(neighbour, return_counts=True)
    m, k, total = len(table), len(counts), n_train + n_heldout
    observed = int(is_train.sum())

    rng = np.random.default_rng(seed)
    held_out_counts = rng.hypergeometric(n_heldout, n_train, k, size=permutations)
    null = np.empty(permutations, dtype=np.int64)
    for b, held in enumerate(held_out_counts):
        null[b] = m - counts[rng.permutation(k)[:held]].sum()

    expected = n_train / total
    statistic = observed / m
    return {
        "statistic": statistic,
        "expected": expected,
        "excess": statistic - expected,
        "max_excess": 1 - expected,
        "null_sd": float(null.std() / m),
        "p_value": (1 + int((null >= observed).sum())) / (1 + permutations),
        "distinct_neighbours": k,
    }


def closest_pairs(table: pd.DataFrame, k: int) -> pd.DataFrame:
    """The k most copy-like generated/training pairs: the rows of a `nearest_neighbours` table with the
    smallest train_distance / heldout_distance ratio (ties by the smaller training distance)."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    return table.sort_values(["ratio", "train_distance"], kind="stable").head(k).reset_index(drop=True)


def write_closest_pairs(
    pairs: pd.DataFrame,
    generated_images: Sequence[str | Path | Image.Image],
    train_images: Sequence[str | Path | Image.Image],
    path: str | Path,
    size: int = 128,
) -> Path:
    """Write `pairs` (from `closest_pairs`) as a PNG grid for inspection, atomically.

    One row per pair: the generated image | its nearest training image, each resized and
    centre-cropped to `size` and labelled underneath (generated row and group, held-out distance |
    training index and distance). generated_images / train_images: every generated / training image
    (paths or PIL images) in the order of the feature rows; only the pairs' images are read.
    The grid is 2 * size wide and len(pairs) * (size + LABEL_HEIGHT) high.
    """
    if len(pairs) == 0:
        raise ValueError("no pairs to draw")
    generated = load_uint8([generated_images[i] for i in pairs["generated"]], size)
    train = load_uint8([train_images[i] for i in pairs["train_index"]], size)
    cell = size + LABEL_HEIGHT
    canvas = Image.new("RGB", (2 * size, len(pairs) * cell), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for row, pair in enumerate(pairs.itertuples(index=False)):
        top = row * cell
        group = "" if pd.isna(pair.group) else f" (group {pair.group})"
        labels = (
            f"generated {pair.generated}{group}\nheld-out d {pair.heldout_distance:.3g}",
            f"train {pair.train_index}\nd {pair.train_distance:.3g}",
        )
        for column, (images, label) in enumerate(zip((generated, train), labels, strict=True)):
            tile = Image.fromarray(images[row].permute(1, 2, 0).numpy())
            canvas.paste(tile, (column * size, top))
            draw.multiline_text(
                (column * size + 2, top + size + 2), label, fill="black", font=font, spacing=2
            )
    path = Path(path)
    write_atomically(path, lambda tmp: canvas.save(tmp, format="PNG"))
    return path


def _checked(name: str, x: np.ndarray, metric: str) -> np.ndarray:
    """x as a non-empty 2-D array of finite values (and, for cosine, no zero rows), checked in blocks
    so that a large training set is never copied whole."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} features must be 2-D [N, D], got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} features are empty (shape {x.shape})")
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise ValueError(f"{name} features must be real numbers, got dtype {x.dtype}")
    for start in range(0, len(x), 65536):
        block = x[start : start + 65536]
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            raise ValueError(f"{name} features hold non-finite values (row {start + int(np.argmax(bad))})")
        if metric == "cosine" and not np.any(block, axis=1).all():
            row = start + int(np.argmin(np.any(block, axis=1)))
            raise ValueError(f"{name} features hold an all-zero row ({row}), which has no cosine distance")
    return x


def _float64(x: np.ndarray, metric: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _nearest(
    queries: np.ndarray, reference: np.ndarray, metric: str, block_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Index of and distance to each query row's nearest reference row (queries already in float64
    and normalised for cosine), scanning the reference in blocks, each converted to float64 once."""
    query_sq = np.einsum("ij,ij->i", queries, queries)
    best = np.full(len(queries), np.inf)
    index = np.zeros(len(queries), dtype=np.int64)
    for start in range(0, len(reference), block_size):
        block = _float64(reference[start : start + block_size], metric)
        block_sq = np.einsum("ij,ij->i", block, block)
        for q in range(0, len(queries), block_size):
            rows = slice(q, q + block_size)
            squared = query_sq[rows, None] - 2 * queries[rows] @ block.T + block_sq[None, :]
            column = squared.argmin(axis=1)
            value = squared[np.arange(len(column)), column]
            better = value < best[rows]
            best[rows] = np.where(better, value, best[rows])
            index[rows] = np.where(better, start + column, index[rows])
    distance = np.linalg.norm(queries - _float64(reference[index], metric), axis=1)
    if metric == "cosine":
        distance = distance**2 / 2  # 1 - cos for unit vectors
    return index, distance
