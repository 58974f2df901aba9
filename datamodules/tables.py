"""What the DataModules that read tables of records share: columns, choices and the drop policy.

The DataModules read their datasets' files into DataFrames, one row per candidate record. These
helpers give them one wording for the same mistakes (a missing column, a setting off its choices)
and one way to leave rows out, so that every record dropped is counted through note_dropped.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from .text_files import DEFAULT_TEXT_ENCODING, read_csv

if TYPE_CHECKING:  # base may import the checks that use these helpers
    from .base import ImageTextDataModule

# Spellings of the split names in the datasets' files (compared case-insensitively) -> ours.
SPLIT_NAMES = {
    "train": "train",
    "val": "val",
    "valid": "val",
    "validate": "val",
    "validation": "val",
    "test": "test",
}


def some_items(items: Iterable, limit: int = 5) -> str:
    """The first `limit` items, and how many there are in all when that is more."""
    items = [str(i) for i in items]
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... ({len(items)} in all)"


def check_choice(name: str, value: str, choices: Iterable[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def read_csv_columns(
    path: Path, columns: list[str], sep: str = ",", encoding: str = DEFAULT_TEXT_ENCODING
) -> pd.DataFrame:
    """A CSV file read as text (no NA parsing: a caption "None" stays that text), checking its columns."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return require_columns(read_csv(path, encoding, sep=sep), columns, path)


def require_columns(table: pd.DataFrame, columns: list[str], path: Path) -> pd.DataFrame:
    """`table` with its column names stripped of spaces, once it is known to have `columns`."""
    table.columns = [str(c).strip() for c in table.columns]
    check_columns(path, columns, list(table.columns))
    return table


def check_columns(path: Path, columns: list[str], found: list[str]) -> None:
    """An error naming the file, the `columns` it lacks and the columns `found` in it, if any lack."""
    missing = [c for c in columns if c not in found]
    if missing:
        raise ValueError(f"{path} has no {', '.join(map(repr, missing))} column; columns found: {found}")


def check_unique(keys: pd.Series, name: str, where: object) -> None:
    """An error naming the `name`s (the values of `keys`) that more than one row has: a few, and how
    many, so that a repeated row never silently makes two records of one image."""
    repeated = keys[keys.duplicated(keep=False)]
    if len(repeated):
        values = repeated.unique()
        raise ValueError(
            f"{where}: {len(values)} {name}(s) repeated, on {len(repeated)} rows: {some_items(values)}; "
            f"each {name} must be on one row only"
        )


def drop_or_raise(
    datamodule: ImageTextDataModule,
    table: pd.DataFrame,
    bad: pd.Series,
    setting: str,
    reason: str,
    examples: pd.Series,
    images: pd.Series | None = None,
) -> pd.DataFrame:
    """The rows of `table` not flagged `bad`, or an error naming some of the bad ones (`examples`).

    `setting` names the DataModule's attribute holding the policy, "error" or "drop", so that the
    error says what to change. A missing image raises FileNotFoundError, anything else ValueError.
    images: each row's image, where rows share images (several prompts per image) and the problem
        is the image's: the error and the drop counts are then of images, not of their records.
    """
    count = int(bad.sum()) if images is None else images[bad].nunique()
    if count and getattr(datamodule, setting) == "error":
        error = FileNotFoundError if setting == "missing_images" else ValueError
        unit = "record(s)" if images is None else f"image(s) ({int(bad.sum())} records)"
        raise error(
            f"{type(datamodule).__name__}: {count} {unit} with {reason}: "
            f"{some_items(examples[bad].unique())}; set {setting}='drop' to leave them out"
        )
    return drop_rows(datamodule, table, bad, reason, examples, images)


def drop_rows(
    datamodule: ImageTextDataModule,
    table: pd.DataFrame,
    bad: pd.Series,
    reason: str,
    examples: pd.Series,
    images: pd.Series | None = None,
) -> pd.DataFrame:
    """The rows of `table` not flagged `bad`; the others are counted per split (the `split` column)
    through note_dropped, so that no record disappears silently. With `images` (see drop_or_raise)
    the count is of images, and the reason says so."""
    for split, rows in examples[bad].groupby(table.loc[bad, "split"], sort=False):
        if images is None:
            datamodule.note_dropped(split, reason, len(rows), str(rows.iloc[0]))
        else:
            datamodule.note_dropped(
                split,
                f"{reason} (counted per image, each with all its records)",
                images[rows.index].nunique(),
                f"{rows.iloc[0]}; {len(rows)} records in all",
            )
    return table[~bad]
