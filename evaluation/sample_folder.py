"""The sample folder: the one owner of the format `medsd sample` writes and `medsd evaluate` reads.

    DIR/images/<prompt_index:06d>_<k:02d>.png   image k of prompt prompt_index
    DIR/manifest.csv        prompt_index, k, prompt, seed, path (relative to DIR), labels: the JSON
                            list of the distinct label sets of the prompt's records
    DIR/sample_config.json  every setting the images depend on, and where the prompts came from:
                            "prompt_source" {"split": "test", "data": [config arguments]} for a
                            dataset split, {"file": PATH} for a prompt file

The prompt source matters to the evaluation: a classifier trained on images rendered from the
test split's reports has seen the test labels, so `medsd evaluate` reads it to refuse the
augmentation protocol on such a folder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from datamodules.atomic import write_atomically
from datamodules.base import stack_labels

MANIFEST_FILE = "manifest.csv"
SETTINGS_FILE = "sample_config.json"
MANIFEST_COLUMNS = ["prompt_index", "k", "prompt", "seed", "path", "labels"]


def sampling_cost_path(folder: str | Path, rank: int = 0) -> Path:
    """Rank `rank`'s sampling cost record (images, seconds, FLOPs per image, peak memory)."""
    return Path(folder) / "cost" / f"rank{rank}.json"


def image_path(prompt_index: int, k: int) -> str:
    """Where image k of prompt `prompt_index` lives, relative to the folder."""
    return f"images/{prompt_index:06d}_{k:02d}.png"


def split_source(split: str, config_args: Sequence[str], max_prompts: int | None = None) -> dict:
    return {"split": split, "data": list(config_args), "max_prompts": max_prompts}


def file_source(path: str | Path) -> dict:
    return {"file": str(Path(path).resolve())}


def write_manifest(folder: Path, rows: list[dict]) -> None:
    """Writes manifest.csv atomically; each row holds MANIFEST_COLUMNS, labels as a list of dicts."""
    frame = pd.DataFrame(
        [{**row, "labels": json.dumps(list(row["labels"]))} for row in rows], columns=MANIFEST_COLUMNS
    )
    write_atomically(folder / MANIFEST_FILE, lambda tmp: frame.to_csv(tmp, index=False))


def read_manifest(folder: str | Path) -> pd.DataFrame:
    """`manifest.csv` with its labels decoded, prompts kept as text (never parsed as numbers)."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: give the output folder of `medsd sample`")
    frame = pd.read_csv(path, dtype={"prompt": str}, keep_default_na=False)
    missing = {"prompt_index", "prompt", "path"} - set(frame.columns)
    if missing:
        raise ValueError(f"{path} has no column(s) {sorted(missing)}; columns found: {list(frame.columns)}")
    frame["labels"] = (
        frame["labels"].map(lambda v: json.loads(v) if v else []) if "labels" in frame else [[]] * len(frame)
    )
    return frame


def read_settings(folder: str | Path) -> dict:
    """`sample_config.json`, or {} for a folder made without one (an older medsd)."""
    path = Path(folder) / SETTINGS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


@dataclass
class Generated:
    """The images of a sampling run, grouped by prompt, and where their prompts came from."""

    paths: list[Path]
    prompts: list[str]
    prompt_index: list[int]
    labels: list[list[dict]]
    prompt_source: dict | None = None
    k: list[int] | None = None  # each image's number among its prompt's
    seeds: list[int | None] | None = None  # the seed each image was drawn with, where recorded

    @classmethod
    def from_folder(cls, folder: str | Path) -> Generated:
        folder = Path(folder)
        table = read_manifest(folder)
        return cls(
            paths=[folder / p for p in table["path"]],
            prompts=list(table["prompt"]),
            prompt_index=[int(i) for i in table["prompt_index"]],
            labels=list(table["labels"]),
            prompt_source=read_settings(folder).get("prompt_source"),
            k=[int(k) for k in (table["k"] if "k" in table else table.groupby("prompt_index").cumcount())],
            seeds=[int(s) if s != "" else None for s in table["seed"]] if "seed" in table else None,
        )

    @property
    def prompt_split(self) -> str | None:
        """The dataset split the prompts were taken from; None for a prompt file or an unknown source."""
        return (self.prompt_source or {}).get("split")

    def stated_labels(self) -> tuple[list[str], torch.Tensor, torch.Tensor, int]:
        """What each image's prompt states: (label names, CheXpert values [N, L], labelled [N] bool,
        number of conflicting values).

        A prompt shared by records with different labels (two reports with the same impression)
        carries several label sets; where they disagree on a label, the image gets -1 (uncertain)
        for it, which the protocols leave out, rather than one report's value. Images whose prompt
        has no labels are marked unlabelled (all NaN).
        """
        names = next((list(label_sets[0]) for label_sets in self.labels if label_sets), [])
        if not names:
            raise ValueError("the manifest's prompts carry no labels (sample from a labelled dataset split)")
        values = torch.full((len(self.labels), len(names)), float("nan"))
        conflicts = 0
        for i, label_sets in enumerate(self.labels):
            if not label_sets:
                continue
            _, stacked = stack_labels([{name: row.get(name) for name in names} for row in label_sets])
            first = stacked[0]
            agree = ((stacked == first) | (stacked.isnan() & first.isnan())).all(dim=0)
            values[i] = torch.where(agree, first, torch.tensor(-1.0))
            conflicts += int((~agree).sum())
        labelled = torch.tensor([bool(label_sets) for label_sets in self.labels])
        return names, values, labelled, conflicts

    def groups(self, rows: Sequence[int] | None = None) -> list[list[int]]:
        """Positions of the images of each prompt, among all images or among `rows` (positions
        into `rows` then): the units an interval resamples."""
        chosen = range(len(self.prompt_index)) if rows is None else rows
        by_prompt: dict[int, list[int]] = {}
        for position, row in enumerate(chosen):
            by_prompt.setdefault(self.prompt_index[row], []).append(position)
        return list(by_prompt.values())
