"""The statistics of a rating study: exact binomial intervals and chance-corrected agreement.

- `clopper_pearson`: the exact (Clopper-Pearson) interval of a proportion, from the beta
  quantiles. Chosen over Wilson's because its coverage is never below the nominal level, at any
  accuracy and any number of answers (Wilson's dips below it at some n and p): a Turing-test
  accuracy is often near 50% or near 100% with a few dozen answers, where that matters.
- `cohen_kappa`: two raters' agreement on the same items beyond what their own answer rates give
  by chance (Cohen 1960), with quadratic weights on an ordinal scale (Cohen 1968).
- `fleiss_kappa`: the same for three or more raters (Fleiss 1971), from the table of how many
  raters put each item in each category.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import beta

INTERVAL_METHOD = "Clopper-Pearson exact binomial interval"


def clopper_pearson(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The exact interval of a proportion `successes / n`; (nan, nan) without answers."""
    if n == 0:
        return float("nan"), float("nan")
    alpha = 1.0 - level
    low = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, n - successes + 1))
    high = 1.0 if successes == n else float(beta.ppf(1 - alpha / 2, successes + 1, n - successes))
    return low, high


def cohen_kappa(first: Sequence, second: Sequence, scale: Sequence | None = None) -> float:
    """Cohen's kappa of two raters' answers on the same items (in the same order); nan when chance
    agreement is complete (both raters gave one and the same answer throughout).

    scale: the ordered categories of an ordinal question (realism's 1..5): disagreements then
    weigh by the squared distance on that scale (quadratic weights), so that 4 against 5 costs
    less than 1 against 5; None: nominal categories, every disagreement alike."""
    if len(first) != len(second):
        raise ValueError(f"the raters answered different numbers of items ({len(first)}, {len(second)})")
    if not first:
        return float("nan")
    categories = list(scale) if scale is not None else sorted(set(first) | set(second), key=str)
    a = np.array([categories.index(x) for x in first])
    b = np.array([categories.index(x) for x in second])
    k = len(categories)
    observed = np.zeros((k, k))
    np.add.at(observed, (a, b), 1.0 / len(a))
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0))
    index = np.arange(k)
    weights = (index[:, None] - index[None, :]) ** 2 if scale is not None else 1 - np.eye(k)
    chance = float((weights * expected).sum())
    return float("nan") if chance == 0.0 else 1.0 - float((weights * observed).sum()) / chance


def category_counts(answers: Sequence[Sequence]) -> np.ndarray:
    """[items, categories]: how many raters gave each answer to each item, from one row of answers
    per item (every rater's answer to it)."""
    categories = sorted({x for row in answers for x in row}, key=str)
    table = np.zeros((len(answers), len(categories)), dtype=np.int64)
    for i, row in enumerate(answers):
        for x in row:
            table[i, categories.index(x)] += 1
    return table


def fleiss_kappa(table: np.ndarray) -> float:
    """Fleiss' kappa of an [items, categories] table of counts, each row summing to the number of
    raters; nan when every answer fell in one category."""
    table = np.asarray(table, dtype=float)
    raters = table.sum(axis=1)
    if len(table) == 0 or not np.all(raters == raters[0]) or raters[0] < 2:
        raise ValueError("Fleiss' kappa needs the same number (>= 2) of raters for every item")
    n = raters[0]
    per_item = ((table * (table - 1)).sum(axis=1)) / (n * (n - 1))
    observed = float(per_item.mean())
    shares = table.sum(axis=0) / table.sum()
    expected = float((shares**2).sum())
    return float("nan") if expected == 1.0 else (observed - expected) / (1.0 - expected)
