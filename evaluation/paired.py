"""A paired comparison of two sweep cells' prompt following: the difference of their insertion rates.

Every cell of a sweep renders the same test prompts with the same seeds, and `medsd evaluate`
scores each cell's images with a classifier trained the same way on the same real data. Much of
the uncertainty of one cell's detection rate is which prompts were drawn (some reports describe a
finding any generator renders, others one that none does), and the two cells share it. A paired
percentile bootstrap keeps it shared: each resample draws the prompts with replacement once and
computes both cells' rates on that same draw; the interval is the central `confidence` share of
the differences (cell A minus cell B). Two per-cell intervals would count the shared part twice.

Pairing needs the same images on both sides: the outcomes (`evaluation.insertion_outcomes`) are
aligned on (prompt_index, k), and a pair is refused (PairingError, with the reason) when the
images, their seeds, their prompts, what the prompts state, or the classifier that scored them
differ.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .bootstrap import bootstrap_intervals

IMAGE = ["prompt_index", "k"]
# Each rate and the statement of the images it counts: the detection rate is the share called
# positive among images whose prompt states the finding, the false-positive rate among those
# whose prompt states it absent.
RATES = {"detection_rate": 1, "false_positive_rate": 0}


class PairingError(ValueError):
    """Two cells' outcomes cannot be compared image by image; the message says why."""


def align(a: pd.DataFrame, b: pd.DataFrame, names: tuple[str, str] = ("A", "B")) -> pd.DataFrame:
    """One row per image and finding: prompt_index, k, finding, stated, positive_a, positive_b."""
    first, second = names
    digests = [sorted(set(table["classifier"])) for table in (a, b)]
    if digests[0] != digests[1]:
        shown = [", ".join(d[:12] for d in digest) for digest in digests]
        raise PairingError(
            f"{first} and {second} were scored by different classifiers (weight digests {shown[0]} and "
            f"{shown[1]}); a paired comparison needs one classifier: the same real data, classifier "
            "settings and --seed (on CPU these train the same one; on GPU training is not bit-reproducible, "
            "so evaluations there may each train a slightly different one)"
        )
    findings = [sorted(set(table["finding"])) for table in (a, b)]
    if findings[0] != findings[1]:
        raise PairingError(f"{first} scored the findings {findings[0]}, {second} {findings[1]}")
    merged = a.merge(b, "outer", [*IMAGE, "finding"], suffixes=("_a", "_b"), indicator=True, validate="1:1")
    only = [
        merged.loc[merged["_merge"] == side, IMAGE].drop_duplicates() for side in ("left_only", "right_only")
    ]
    if len(only[0]) or len(only[1]):
        example = pd.concat(only).iloc[0]
        raise PairingError(
            f"{first} and {second} rendered different images: {len(only[0])} only in {first}, "
            f"{len(only[1])} only in {second} (e.g. prompt {example['prompt_index']} image {example['k']})"
        )
    for column, what in (("seed", "seeds"), ("prompt_digest", "prompts"), ("stated", "statements")):
        differ = _values(merged, column + "_a") != _values(merged, column + "_b")
        if differ.any():
            row = merged[differ].iloc[0]
            images = merged.loc[differ, IMAGE].drop_duplicates()
            raise PairingError(
                f"{first} and {second} rendered {len(images)} image(s) with different {what} (e.g. prompt "
                f"{row['prompt_index']} image {row['k']}, {row['finding']}): a paired comparison needs the "
                "same prompts, with the same labels, and the same seeds"
            )
    return merged.rename(
        columns={"stated_a": "stated", "called_positive_a": "positive_a", "called_positive_b": "positive_b"}
    )[[*IMAGE, "finding", "stated", "positive_a", "positive_b"]]


def _values(table: pd.DataFrame, column: str) -> pd.Series:
    """The column with missing values as "", so that two missing values compare equal."""
    return table[column].astype(object).fillna("")


def paired_differences(
    a: pd.DataFrame,
    b: pd.DataFrame,
    names: tuple[str, str] = ("A", "B"),
    resamples: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
) -> list[dict]:
    """Per finding and rate: cell A's rate minus cell B's, with a paired bootstrap interval over
    prompts (`resamples` > 0), whether it excludes 0, and the N prompts and images counted (the
    same in both cells). A rate no image counts for (no prompt states the finding) is left out."""
    table = align(a, b, names).reset_index(drop=True)
    positive_a, positive_b = table["positive_a"].to_numpy(bool), table["positive_b"].to_numpy(bool)
    counted = {}  # (finding, rate) -> the rows it counts
    for finding in sorted(set(table["finding"])):
        for rate, value in RATES.items():
            rows = ((table["finding"] == finding) & table["stated"].eq(value).fillna(False)).to_numpy(bool)
            if rows.any():
                counted[finding, rate] = rows

    def differences(indices: np.ndarray) -> dict[tuple[str, str], float]:
        scores = {}
        for key, rows in counted.items():
            chosen = indices[rows[indices]]
            scores[key] = positive_a[chosen].mean() - positive_b[chosen].mean() if len(chosen) else np.nan
        return scores

    point = differences(np.arange(len(table)))
    intervals = {key: (None, None) for key in counted}
    if resamples and counted:
        groups = list(table.groupby("prompt_index").indices.values())
        intervals = bootstrap_intervals(differences, len(table), resamples, confidence, seed, groups)
    results = []
    for (finding, rate), rows in counted.items():
        low, high = intervals[finding, rate]
        results.append(
            {
                "finding": finding,
                "rate": rate,
                "value": float(point[finding, rate]),
                "ci_low": low,
                "ci_high": high,
                "excludes_zero": None if low is None else bool(low > 0 or high < 0),
                "n_prompts": int(table.loc[rows, "prompt_index"].nunique()),
                "n_images": int(rows.sum()),
            }
        )
    return results
