"""Image-text pairs listed in a CSV file, or stored as a folder of images with caption files."""

from __future__ import annotations

import logging
import os
from collections import Counter
from functools import cached_property
from pathlib import Path
from typing import Literal

import pandas as pd

from .base import SPLITS, ImageTextDataModule, Record
from .images import IMAGE_SUFFIXES
from .integrity import outside_root
from .tables import SPLIT_NAMES, check_choice, drop_or_raise, read_csv_columns, some_items
from .text_files import DEFAULT_TEXT_ENCODING, check_text_encoding, read_text

log = logging.getLogger(__name__)


class CSVImageTextDataModule(ImageTextDataModule):
    """Images and captions from a CSV file or a folder.

    source: one of
        - a CSV file with columns `image` (a path relative to `image_root`, or absolute) and
          `prompt`, and optionally `split` (train / val / test; validate, valid and validation
          also mean val). Without a `split` column every row is for training;
        - a folder holding such a CSV named `metadata.csv`;
        - a folder of images (.png .jpg .jpeg .bmp .tif .tiff, subfolders included), each with
          a caption in a text file of the same name (`scan1.png` + `scan1.txt`); all train.
    image_root: the folder image paths are relative to; default: the CSV's folder.
    images_outside_root: CSV image paths that resolve outside that folder (absolute ones, ones
        with `..` or through a symlink) are "allow"ed, and counted and logged once with an example,
        or an "error" naming them: a config shared with others then reads nothing but its dataset.
    empty_prompts: what to do with blank captions: "error", or "drop" those images (with a
        warning). Dropping rather than training them unconditionally keeps the dataset what
        its captions say.
    duplicate_rows: what to do with a CSV row repeating the image, prompt and split of an earlier
        one (a copy-paste slip that counts the pair twice): "error", naming the lines, or "drop"
        the repeats (counted). The same image with other prompts is kept: several captions per
        image are a dataset's choice.
    text_encoding: the encoding of the CSV and the caption files ("utf-8", a byte-order mark
        allowed; "latin-1" or "cp1252" for files from older tools). A file that does not decode
        is an error naming it, its line and the byte offset.
    The other arguments are ImageTextDataModule's.
    """

    # The record index (see ImageTextDataModule) watches the CSV read; a folder of caption files has none.
    indexed = True

    def __init__(
        self,
        source: str,
        image_root: str | None = None,
        images_outside_root: Literal["allow", "error"] = "allow",
        empty_prompts: Literal["error", "drop"] = "error",
        duplicate_rows: Literal["error", "drop"] = "error",
        text_encoding: str = DEFAULT_TEXT_ENCODING,
        image_size: int = 512,
        **kwargs,
    ):
        super().__init__(image_size=image_size, **kwargs)  # batch_size, ...: see ImageTextDataModule
        if empty_prompts not in ("error", "drop"):
            raise ValueError(f"empty_prompts must be 'error' or 'drop', got {empty_prompts!r}")
        check_choice("duplicate_rows", duplicate_rows, ("error", "drop"))
        check_choice("images_outside_root", images_outside_root, ("allow", "error"))
        self.source = Path(source)
        self.image_root = None if image_root is None else Path(image_root)
        self.images_outside_root = images_outside_root
        self.empty_prompts = empty_prompts
        self.duplicate_rows = duplicate_rows
        self.text_encoding = check_text_encoding(text_encoding)

    def load_records(self, split: str) -> list[Record]:
        return self._records_by_split[split]

    @cached_property
    def _records_by_split(self) -> dict[str, list[Record]]:
        # The source is read once for all three splits.
        if self.source.is_file():
            return self._read_csv(self.source)
        if (self.source / "metadata.csv").is_file():
            return self._read_csv(self.source / "metadata.csv")
        if self.source.is_dir():
            return {"train": self._read_caption_files(self.source), "val": [], "test": []}
        raise FileNotFoundError(f"data source {self.source} does not exist")

    def _read_csv(self, path: Path) -> dict[str, list[Record]]:
        self.note_source(path, table=True)
        table = read_csv_columns(path, ["image", "prompt"], encoding=self.text_encoding)
        # Line numbers as a spreadsheet or an editor shows them (the header is line 1); exact
        # unless a quoted prompt spans several lines.
        table["line"] = table.index + 2

        if "split" in table.columns:
            splits = table["split"].str.strip().str.lower().map(SPLIT_NAMES)
            unknown = splits.isna()
            if unknown.any():
                raise ValueError(
                    f"{path}: unknown split value(s) {sorted(set(table.loc[unknown, 'split']))} on line(s) "
                    f"{some_items(table.loc[unknown, 'line'])}; expected train, val (or validate, valid, "
                    "validation) or test"
                )
            table["split"] = splits
        else:
            table["split"] = "train"

        table["prompt"] = table["prompt"].str.strip()
        empty = table["prompt"] == ""
        self._handle_empty(f"line(s) {some_items(table.loc[empty, 'line'])}", table.loc[empty, "split"], path)
        table = table[~empty]

        root = self.image_root or path.parent
        table["file"] = [str(root / image.strip()) for image in table["image"]]  # absolute: root ignored
        self._check_confined(table["file"], root, path)
        missing = [file for file in table["file"] if not os.path.isfile(file)]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} image(s) listed in {path} do not exist: {some_items(missing)}"
            )
        table = self._without_repeated_rows(table, path)

        records: dict[str, list[Record]] = {split: [] for split in SPLITS}
        for image, prompt, split in zip(table["file"], table["prompt"], table["split"], strict=True):
            records[split].append(Record(image, prompt))
        return records

    def _check_confined(self, files: pd.Series, root: Path, path: Path) -> None:
        """Image files outside `root` are an error naming them, or logged once (images_outside_root)."""
        outside = outside_root(files, root)
        if not outside:
            return
        if self.images_outside_root == "error":
            raise ValueError(
                f"{len(outside)} image path(s) in {path} resolve outside the dataset root {root}: "
                f"{some_items(outside)}; move them under it or set images_outside_root='allow'"
            )
        log.warning(
            "%s: %d of %d image path(s) in %s resolve outside the dataset root %s, e.g. %s "
            "(allowed: images_outside_root='error' refuses them)",
            type(self).__name__,
            len(outside),
            len(files),
            path,
            root,
            outside[0],
        )

    def _without_repeated_rows(self, table: pd.DataFrame, path: Path) -> pd.DataFrame:
        """`table` without the rows repeating an earlier row's image (as a normalised path), prompt
        and split, or an error naming their lines (duplicate_rows)."""
        keys = table.assign(file=table["file"].map(os.path.normpath))[["file", "prompt", "split"]]
        repeated = keys.duplicated()
        where = f"{path} line " + table["line"].astype(str)
        return drop_or_raise(
            self, table, repeated, "duplicate_rows", "the image, prompt and split of an earlier row", where
        )

    def _read_caption_files(self, folder: Path) -> list[Record]:
        images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not images:
            raise FileNotFoundError(
                f"{folder} has neither a metadata.csv nor images ({' '.join(sorted(IMAGE_SUFFIXES))})"
            )
        uncaptioned = [p for p in images if not p.with_suffix(".txt").is_file()]
        if uncaptioned:
            raise FileNotFoundError(
                f"{len(uncaptioned)} image(s) in {folder} have no caption file (same name, .txt): "
                f"{some_items(uncaptioned)}"
            )
        records = [
            Record(str(p), read_text(p.with_suffix(".txt"), self.text_encoding).strip()) for p in images
        ]
        empty = [Path(r.image).with_suffix(".txt") for r in records if not r.prompt]
        self._handle_empty(f"caption file(s) {some_items(empty)}", ["train"] * len(empty), folder)
        return [r for r in records if r.prompt]

    def _handle_empty(self, where: str, splits, source: Path) -> None:
        """Empty prompts (their splits given): an error, or dropped and counted per split."""
        if len(splits) == 0:
            return
        if self.empty_prompts == "error":
            raise ValueError(f"{source}: empty prompt in {where}; fill them in or set empty_prompts='drop'")
        for split, count in Counter(splits).items():
            self.note_dropped(split, "empty prompt", count, f"{source}: {where}")
