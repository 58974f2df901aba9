"""The insertion protocol's per-image outcomes: `<metrics>/insertion_outcomes.csv`, beside metrics.json.

    prompt_index, k      image k of prompt prompt_index (the sample folder's numbering)
    seed                 the seed it was drawn with (empty where the manifest has none)
    prompt_digest        the first 16 hex digits of the SHA-256 of the prompt's text
    finding              one of the findings scored
    stated               what the prompt states: 1 present, 0 absent, -1 uncertain, empty blank
    called_positive      1 when the classifier's probability reached the finding's threshold, else 0
    classifier           `TrainedClassifier.digest()` of the classifier that scored the image

metrics.json holds the rates; this file holds what they are counted from, so that two sweep cells
that rendered the same prompts with the same seeds can be compared image by image
(`evaluation.paired`): the digests say whether the prompts, the seeds and the classifier agree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from datamodules.atomic import write_atomically

OUTCOMES_FILE = "insertion_outcomes.csv"
COLUMNS = ["prompt_index", "k", "seed", "prompt_digest", "finding", "stated", "called_positive", "classifier"]
DTYPES = {"seed": "Int64", "prompt_digest": str, "finding": str, "stated": "Int64", "classifier": str}


def prompt_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def outcome_table(
    images: pd.DataFrame, findings: Sequence[str], stated: torch.Tensor, positive: torch.Tensor, digest: str
) -> pd.DataFrame:
    """One row per image and finding. images: prompt_index, k, seed, prompt per image (N rows);
    stated: [N, F] CheXpert values of `findings`; positive: [N, F] bool, called positive."""
    parts = []
    for column, finding in enumerate(findings):
        part = images[["prompt_index", "k", "seed"]].copy()
        part["prompt_digest"] = [prompt_digest(text) for text in images["prompt"]]
        part["finding"] = finding
        values = stated[:, column].tolist()
        part["stated"] = pd.array([None if np.isnan(v) else int(v) for v in values], dtype="Int64")
        part["called_positive"] = positive[:, column].numpy().astype(int)
        part["classifier"] = digest
        parts.append(part)
    return pd.concat(parts, ignore_index=True)[COLUMNS]


def write_outcomes(folder: Path, table: pd.DataFrame) -> Path:
    path = Path(folder) / OUTCOMES_FILE
    write_atomically(path, lambda tmp: table.to_csv(tmp, index=False))
    return path


def read_outcomes(folder: str | Path) -> pd.DataFrame:
    """The outcomes an evaluation wrote into `folder`; FileNotFoundError when it wrote none."""
    path = Path(folder) / OUTCOMES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    table = pd.read_csv(path, dtype=DTYPES)
    missing = set(COLUMNS) - set(table.columns)
    if missing:
        raise ValueError(f"{path} has no column(s) {sorted(missing)}")
    return table
