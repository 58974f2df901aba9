"""The sweep report's "Prompt following, paired" section: the cells' insertion rates compared in pairs.

Every cell renders the same test prompts with the same seeds and is scored by the same classifier,
so two cells' detection (or false-positive) rates can be compared image by image
(`evaluation.paired`): the interval of the difference is narrower than two per-cell intervals
suggest. Every pair of done cells is compared, the earlier in the matrix's order first (A - B);
not each cell against the best one, because the best, chosen on these same outcomes, would be
favoured by its own luck. The intervals are each pair's own, not adjusted for the number of pairs.

A cell that cannot take part (not done, not evaluated, the insertion protocol skipped, or
evaluated by a medsd that kept no per-image outcomes) is listed with the reason, and so is a pair
that was refused (different prompts, seeds or classifiers).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import pandas as pd

from evaluation.insertion_outcomes import OUTCOMES_FILE, read_outcomes
from evaluation.paired import PairingError, paired_differences

from .evaluate import markdown_table

RESAMPLES, CONFIDENCE, SEED = 200, 0.95, 0
METRIC = "paired_difference_{rate}"
TITLE = "Prompt following, paired"
# The columns paired rows add to summary.csv.
PAIRED_COLUMNS = ("compared_with", "excludes_zero", "n_prompts")


@dataclass
class PairedComparison:
    """rows: summary.csv's rows (cell A, `compared_with` B, `n_prompts`, `excludes_zero` added to its
    columns); not_compared: cell -> why; refused:
    "A vs B" -> why."""

    rows: list[dict] = field(default_factory=list)
    not_compared: dict[str, str] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)


def compare_cells(folders: list) -> PairedComparison:
    """Every pair of the done cells with outcomes, in the folders' order; the others with the reason."""
    comparison = PairedComparison()
    outcomes = {}
    for folder in folders:
        state = folder.status()["state"]
        if state != "done":
            comparison.not_compared[folder.cell.name] = f"not done ({state})"
            continue
        try:
            outcomes[folder.cell.name] = (folder, cell_outcomes(folder.metrics))
        except Unavailable as reason:
            comparison.not_compared[folder.cell.name] = str(reason)
    for (first, (folder, a)), (second, (_, b)) in combinations(outcomes.items(), 2):
        try:
            differences = paired_differences(a, b, (first, second), RESAMPLES, CONFIDENCE, SEED)
        except PairingError as error:
            comparison.refused[f"{first} vs {second}"] = str(error)
            continue
        base = {"cell": first, **dict(folder.cell.labels), "state": "done", "extractor": "classifier"}
        comparison.rows += [
            {
                **base,
                "metric": METRIC.format(rate=d["rate"]),
                "label": d["finding"],
                "compared_with": second,
                "value": d["value"],
                "ci_low": d["ci_low"],
                "ci_high": d["ci_high"],
                "excludes_zero": d["excludes_zero"],
                "n_prompts": d["n_prompts"],
                "n_generated": d["n_images"],
            }
            for d in differences
        ]
    return comparison


class Unavailable(Exception):
    """A cell has no outcomes to compare; the message says why."""


def cell_outcomes(metrics: Path) -> pd.DataFrame:
    """The outcomes of the evaluation in `metrics`: only those its metrics.json names, written by
    the classifier it names, so that a file left by an earlier evaluation is never read."""
    path = metrics / "metrics.json"
    if not path.is_file():
        raise Unavailable("not evaluated")
    result = json.loads(path.read_text())
    insertion = result.get("classifier_protocols", {}).get("insertion")
    if insertion is None:
        skipped = [
            f"{name} skipped: {reason}"
            for name, reason in result.get("skipped", {}).items()
            if name in ("classifier protocols", "insertion protocol")
        ]
        raise Unavailable("; ".join(skipped) or "its evaluation ran no insertion protocol")
    if not insertion.get("outcomes"):
        raise Unavailable("evaluated by a medsd that kept no per-image outcomes (rerun `medsd evaluate`)")
    try:
        table = read_outcomes(metrics)
    except (FileNotFoundError, ValueError) as error:
        raise Unavailable(f"unreadable outcomes: {error}") from error
    if set(table["classifier"]) != {insertion["classifier_digest"]}:
        raise Unavailable(
            f"{OUTCOMES_FILE} was not written by the evaluation in metrics.json (another classifier)"
        )
    return table


def markdown(comparison: PairedComparison) -> str:
    lines = [
        f"## {TITLE}",
        "",
        "The insertion protocol's rates of every pair of done cells, A minus B (A the earlier in the "
        "matrix), paired by prompt: both cells' rates on the same resample of the test prompts "
        f"({RESAMPLES} resamples, seed {SEED}), so the {CONFIDENCE:.0%} interval is that of the difference. "
        "Every pair rather than each cell against the best one, which, chosen on these same outcomes, "
        "would be favoured by its own luck. Each interval is the pair's own, not adjusted for the number "
        "of pairs. Detection rate: the share called positive of the images whose prompt states the "
        "finding; false-positive rate: of those whose prompt states it absent.",
        "",
    ]
    if comparison.rows:
        table = pd.DataFrame(comparison.rows)
        table = pd.DataFrame(
            {
                "A": table["cell"],
                "B": table["compared_with"],
                "finding": table["label"],
                "rate": table["metric"].str.removeprefix(METRIC.format(rate="")).str.replace("_", " "),
                "A - B": table["value"],
                "interval": [_interval(r) for r in comparison.rows],
                "excludes 0": table["excludes_zero"].map({True: "yes", False: "no"}),
                "N prompts": table["n_prompts"],
                "N images": table["n_generated"],
            }
        )
        lines += [*markdown_table(table), ""]
    else:
        lines += ["No pair of cells could be compared.", ""]
    lines += [f"- {cell}: not compared: {why}" for cell, why in comparison.not_compared.items()]
    lines += [f"- {pair}: refused: {why}" for pair, why in comparison.refused.items()]
    return "\n".join(lines).rstrip() + "\n"


def _interval(row: dict) -> str:
    if row["ci_low"] is None:
        return ""
    return f"[{row['ci_low']:.3g}, {row['ci_high']:.3g}]"
