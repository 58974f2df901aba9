"""ROCOv2: radiology figures from PubMed Central, with their captions and UMLS concepts.

Two distributions of the same data are read: the official one (Zenodo: folders of JPEGs and CSV
files) and the Hugging Face hub's (`eltorio/ROCOv2-radiology`: parquet files embedding the images).
"""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from .base import ImageTextDataModule, Record
from .hub_files import hub_files_by_split, materialise_images, read_table_columns
from .images import existing_names
from .tables import check_choice, check_unique, drop_or_raise, drop_rows, read_csv_columns
from .text_files import DEFAULT_TEXT_ENCODING, check_text_encoding

log = logging.getLogger(__name__)

# This package's split names -> ROCOv2's image folder and CSV file prefix.
OFFICIAL_SPLITS = {"train": "train", "val": "valid", "test": "test"}


class ROCOv2DataModule(ImageTextDataModule):
    """ROCOv2 as distributed on Zenodo: `<root>/{train,valid,test}/<ID>.jpg` and the CSV files.

    Reads `{split}_captions.csv` (ID, Caption), the concepts file chosen by `concepts` (ID, CUIs
    separated by ';') and `cui_mapping.csv` (CUI, Canonical name); ROCOv2's train / valid / test
    become "train" / "val" / "test". IDs name their file without the extension (`<ID>.jpg`); an ID
    that already ends in .jpg is accepted too. An ID on two rows of a captions or concepts file is
    an error naming it: each image has one caption and one set of concepts.

    modality_cuis: keep only images having at least one of these CUIs, e.g. ["C0040405"] for CT or
        ["C1306645"] for plain X-rays; None keeps every modality.
    require_cuis: keep only images having all of these CUIs (e.g. an anatomy, ["C0817096"] chest).
    concepts: where the CUIs come from: "manual", the curated modality / anatomy / direction
        concepts (`{split}_concepts_manual.csv`), or "all", the automatically extracted ones
        (`{split}_concepts.csv`). Only the CUI filters need that file: without them a missing one
        is a warning and the records simply carry no CUIs.
    missing_images: "error" (naming the files) or "drop" the records whose image is not there.
    empty_prompts: "error" (naming the IDs) or "drop" the records with a blank caption.
    text_encoding: the encoding of the CSV files ("utf-8", a byte-order mark allowed; "latin-1" for
        a copy re-saved by an older tool). A file that does not decode is an error naming it, its
        line and the byte offset.
    The other arguments are ImageTextDataModule's.

    Records carry no labels: ROCOv2's concepts state what an image shows, never what it does not,
    so they are no findings table with negatives. They go to `meta` instead: "id", "cuis" (the
    chosen concepts, ';'-separated, in file order), "concept_names" (their canonical names, in the
    same order, when cui_mapping.csv is there) and, with a modality filter, "modality" (the name of
    the record's first CUI among modality_cuis). Every record left out is counted in `dropped`.
    """

    # The record index (see ImageTextDataModule) watches the tables read and the image folder's listing.
    indexed = True

    def __init__(
        self,
        root: str,
        modality_cuis: list[str] | None = None,
        require_cuis: list[str] | None = None,
        concepts: Literal["manual", "all"] = "manual",
        missing_images: Literal["error", "drop"] = "error",
        empty_prompts: Literal["error", "drop"] = "error",
        text_encoding: str = DEFAULT_TEXT_ENCODING,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        check_choice("concepts", concepts, ("manual", "all"))
        check_choice("missing_images", missing_images, ("error", "drop"))
        check_choice("empty_prompts", empty_prompts, ("error", "drop"))
        self.root = Path(root)
        # None and [] alike mean "no filter": an empty list of acceptable CUIs would keep nothing.
        self.modality_cuis = frozenset(modality_cuis or ())
        self.require_cuis = frozenset(require_cuis or ())
        self.concepts = concepts
        self.missing_images = missing_images
        self.empty_prompts = empty_prompts
        self.text_encoding = check_text_encoding(text_encoding)

    def load_records(self, split: str) -> list[Record]:
        table = self._read_split(split).assign(split=split)
        # The user's selection comes first, so that problems in records they do not want stop nothing.
        table = self._filter_by_cuis(table)
        empty = table["caption"].str.strip() == ""
        table = drop_or_raise(self, table, empty, "empty_prompts", "empty caption", table["where"])
        table = self._locate_images(split, table)
        missing = table["missing"] != ""
        table = drop_or_raise(self, table, missing, "missing_images", "image missing", table["missing"])
        return [self._record(row) for row in table.itertuples(index=False)]

    def _read_split(self, split: str) -> pd.DataFrame:
        """The split's rows as columns id, caption, cuis (a tuple) and where (for messages)."""
        prefix = OFFICIAL_SPLITS[split]
        path = self.root / f"{prefix}_captions.csv"
        self.note_source(path, table=True)
        captions = read_csv_columns(path, ["ID", "Caption"], encoding=self.text_encoding)
        ids = captions["ID"].map(_roco_id)
        check_unique(ids, "ID", path)
        concepts = self._concepts_of(prefix)
        return pd.DataFrame(
            {
                "id": ids,
                "caption": captions["Caption"].str.strip(),
                "cuis": [concepts.get(i, ()) for i in ids],
                "where": ids + f" ({path})",
            }
        )

    def _concepts_of(self, prefix: str) -> dict[str, tuple[str, ...]]:
        suffix = "_manual" if self.concepts == "manual" else ""
        path = self.root / f"{prefix}_concepts{suffix}.csv"
        self.note_source(path, table=True)
        if not path.is_file():
            if self.modality_cuis or self.require_cuis:
                raise FileNotFoundError(f"{path} does not exist; filtering by CUI needs it")
            log.warning("%s does not exist: the %s records carry no CUIs", path, prefix)
            return {}
        table = read_csv_columns(path, ["ID", "CUIs"], encoding=self.text_encoding)
        ids = table["ID"].map(_roco_id)
        check_unique(ids, "ID", path)
        return {image_id: _split_cuis(cuis) for image_id, cuis in zip(ids, table["CUIs"], strict=True)}

    @cached_property
    def _cui_names(self) -> dict[str, str]:
        """CUI -> canonical name, from cui_mapping.csv; empty when the file is not there."""
        path = self.root / "cui_mapping.csv"
        self.note_source(path, table=True)
        if not path.is_file():
            return {}
        table = read_csv_columns(path, ["CUI", "Canonical name"], encoding=self.text_encoding)
        return dict(zip(table["CUI"].str.strip(), table["Canonical name"].str.strip(), strict=True))

    def _filter_by_cuis(self, table: pd.DataFrame) -> pd.DataFrame:
        if self.modality_cuis:
            unwanted = table["cuis"].map(self.modality_cuis.isdisjoint).astype(bool)
            table = drop_rows(self, table, unwanted, "no matching modality CUI", table["id"])
        if self.require_cuis:
            lacking = ~table["cuis"].map(self.require_cuis.issubset).astype(bool)
            table = drop_rows(self, table, lacking, "lacks a required CUI", table["id"])
        return table

    def _locate_images(self, split: str, table: pd.DataFrame) -> pd.DataFrame:
        """Adds `image` (the file) and `missing` (the file again when it is not there, else "")."""
        folder = self.root / OFFICIAL_SPLITS[split]
        if not folder.is_dir():
            raise FileNotFoundError(
                f"ROCOv2 image folder {folder} does not exist "
                f"(unzip {OFFICIAL_SPLITS[split]}_images.zip into {self.root})"
            )
        self.note_source(folder)  # its listing says which images are missing
        images = pd.Series([str(folder / f"{image_id}.jpg") for image_id in table["id"]], index=table.index)
        found = (table["id"] + ".jpg").isin(existing_names(folder))
        return table.assign(image=images, missing=images.where(~found, ""))

    def _record(self, row: Any) -> Record:
        meta = {"id": row.id, "cuis": ";".join(row.cuis)}
        if self._cui_names:
            meta["concept_names"] = ";".join(self._cui_names.get(cui, cui) for cui in row.cuis)
        modality = next((cui for cui in row.cuis if cui in self.modality_cuis), None)
        if modality is not None:
            meta["modality"] = self._cui_names.get(modality, modality)
        return Record(image=row.image, prompt=row.caption, meta=meta)


class ROCOv2ParquetDataModule(ROCOv2DataModule):
    """ROCOv2 from the Hugging Face hub (`eltorio/ROCOv2-radiology`), as a local folder of files.

    root: the downloaded folder (or any folder holding the files, subfolders included): parquet
        files named by split, like `data/train-00000-of-00027.parquet`, `validation-*`, `test-*`,
        with columns `image` ({bytes, path}), `image_id`, `caption` and `cui` (a list of CUIs, the
        ones the CUI filters see). Arrow files from `datasets.save_to_disk` are read too, named
        by split or in a folder named by split.
    image_dir: where the images are written as `<image_dir>/{train,valid,test}/<image_id>.jpg`,
        the official layout. The whole export is about 19 GB, too much to hold in memory: the
        images of the records kept are written once, and later runs only read the small columns
        and find the files there. Writes are atomic, so an interrupted run leaves no partial image.
    missing_images: "error" or "drop" the records whose row has no image bytes.
    The other arguments are ROCOv2DataModule's; canonical CUI names are not part of this export
    (text_encoding applies to a cui_mapping.csv put beside it; parquet text is always UTF-8).
    """

    # Not in the record index: its sources are the parquet files themselves (gigabytes to compare).
    indexed = False

    def __init__(
        self,
        root: str,
        image_dir: str,
        modality_cuis: list[str] | None = None,
        require_cuis: list[str] | None = None,
        missing_images: Literal["error", "drop"] = "error",
        empty_prompts: Literal["error", "drop"] = "error",
        **kwargs: Any,
    ):
        super().__init__(
            root,
            modality_cuis=modality_cuis,
            require_cuis=require_cuis,
            concepts="all",
            missing_images=missing_images,
            empty_prompts=empty_prompts,
            **kwargs,
        )
        self.image_dir = Path(image_dir)

    @cached_property
    def _files_by_split(self) -> dict[str, list[Path]]:
        return hub_files_by_split(self.root)

    def _read_split(self, split: str) -> pd.DataFrame:
        frames = []
        for path in self._files_by_split[split]:
            table = read_table_columns(path, ["image", "image_id", "caption", "cui"])
            ids = table["image_id"].fillna("").map(_roco_id)
            rows = range(len(table))
            frames.append(
                pd.DataFrame(
                    {
                        "id": ids,
                        "caption": table["caption"].fillna("").str.strip(),
                        "cuis": table["cui"].map(lambda cuis: tuple(c.strip() for c in cuis or ())),
                        "where": [f"{i} ({path.name} row {row})" for i, row in zip(ids, rows, strict=True)],
                        "file": path,
                        "row": rows,
                    }
                )
            )
        if not frames:
            log.warning("%s: no %s files under %s", type(self).__name__, split, self.root)
            return pd.DataFrame(columns=["id", "caption", "cuis", "where", "file", "row"])
        table = pd.concat(frames, ignore_index=True)
        check_unique(table["id"], "image_id", f"the {split} files under {self.root}")
        return table

    def _locate_images(self, split: str, table: pd.DataFrame) -> pd.DataFrame:
        folder = self.image_dir / OFFICIAL_SPLITS[split]
        images, missing = materialise_images(table, table["id"] + ".jpg", folder)
        return table.assign(image=images, missing=missing)


def _roco_id(raw: str) -> str:
    """An ID as the CSV files write it: no surrounding spaces and no .jpg (which some copies add)."""
    raw = str(raw).strip()
    return raw[:-4] if raw.lower().endswith(".jpg") else raw


def _split_cuis(text: str) -> tuple[str, ...]:
    return tuple(cui.strip() for cui in text.split(";") if cui.strip())
