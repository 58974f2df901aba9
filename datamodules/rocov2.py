"""ROCOv2: radiology figures from PubMed Central, with their captions and UMLS concepts.

Two distributions of the same data are read: the official one (Zenodo: folders of JPEGs and CSV
files) and the Hugging Face hub's (`eltorio/ROCOv2-radiology`: parquet files embedding the images).
The helpers for hub exports (parquet or Arrow files with an `image` column of {bytes, path}) and for
the error-or-drop policies live here too; the MedVQA-GI module uses them as well.
"""

from __future__ import annotations

import bisect
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from functools import cached_property, partial
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .base import ImageTextDataModule, Record
from .csv_folder import _some

log = logging.getLogger(__name__)

# This package's split names -> ROCOv2's image folder and CSV file prefix.
OFFICIAL_SPLITS = {"train": "train", "val": "valid", "test": "test"}
# How hub exports name their splits (file-name prefix or folder name) -> this package's split names.
HUB_SPLITS = {"train": "train", "validation": "val", "valid": "val", "val": "val", "test": "test"}
HUB_SUFFIXES = (".parquet", ".arrow")


class ROCOv2DataModule(ImageTextDataModule):
    """ROCOv2 as distributed on Zenodo: `<root>/{train,valid,test}/<ID>.jpg` and the CSV files.

    Reads `{split}_captions.csv` (ID, Caption), the concepts file chosen by `concepts` (ID, CUIs
    separated by ';') and `cui_mapping.csv` (CUI, Canonical name); ROCOv2's train / valid / test
    become "train" / "val" / "test". IDs name their file without the extension (`<ID>.jpg`); an ID
    that already ends in .jpg is accepted too.

    modality_cuis: keep only images having at least one of these CUIs, e.g. ["C0040405"] for CT or
        ["C1306645"] for plain X-rays; None keeps every modality.
    require_cuis: keep only images having all of these CUIs (e.g. an anatomy, ["C0817096"] chest).
    concepts: where the CUIs come from: "manual", the curated modality / anatomy / direction
        concepts (`{split}_concepts_manual.csv`), or "all", the automatically extracted ones
        (`{split}_concepts.csv`). Only the CUI filters need that file: without them a missing one
        is a warning and the records simply carry no CUIs.
    missing_images: "error" (naming the files) or "drop" the records whose image is not there.
    empty_prompts: "error" (naming the IDs) or "drop" the records with a blank caption.
    The other arguments are ImageTextDataModule's.

    Records carry no labels: ROCOv2's concepts state what an image shows, never what it does not,
    so they are no findings table with negatives. They go to `meta` instead: "id", "cuis" (the
    chosen concepts, ';'-separated, in file order), "concept_names" (their canonical names, in the
    same order, when cui_mapping.csv is there) and, with a modality filter, "modality" (the name of
    the record's first CUI among modality_cuis). Every record left out is counted in `dropped`.
    """

    def __init__(
        self,
        root: str,
        modality_cuis: list[str] | None = None,
        require_cuis: list[str] | None = None,
        concepts: Literal["manual", "all"] = "manual",
        missing_images: Literal["error", "drop"] = "error",
        empty_prompts: Literal["error", "drop"] = "error",
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
        captions = read_csv_columns(path, ["ID", "Caption"])
        ids = captions["ID"].map(_roco_id)
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
        if not path.is_file():
            if self.modality_cuis or self.require_cuis:
                raise FileNotFoundError(f"{path} does not exist; filtering by CUI needs it")
            log.warning("%s does not exist: the %s records carry no CUIs", path, prefix)
            return {}
        table = read_csv_columns(path, ["ID", "CUIs"])
        return {_roco_id(i): _split_cuis(cuis) for i, cuis in zip(table["ID"], table["CUIs"], strict=True)}

    @cached_property
    def _cui_names(self) -> dict[str, str]:
        """CUI -> canonical name, from cui_mapping.csv; empty when the file is not there."""
        path = self.root / "cui_mapping.csv"
        if not path.is_file():
            return {}
        table = read_csv_columns(path, ["CUI", "Canonical name"])
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
    The other arguments are ROCOv2DataModule's; canonical CUI names are not part of this export.
    """

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
        files: dict[str, list[Path]] = {split: [] for split in OFFICIAL_SPLITS}
        for path in find_hub_files(self.root):
            files[_hub_split(path)].append(path)
        return files

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
        return pd.concat(frames, ignore_index=True)

    def _locate_images(self, split: str, table: pd.DataFrame) -> pd.DataFrame:
        folder = self.image_dir / OFFICIAL_SPLITS[split]
        names = table["id"] + ".jpg"
        for path, rows in table["row"].groupby(table["file"], sort=False):
            write_images(path, {row: folder / names[i] for i, row in rows.items()})
        found = names.isin(existing_names(folder))
        images = [str(folder / name) for name in names]
        return table.assign(image=images, missing=(table["where"] + ": no image bytes").where(~found, ""))


# --- policies and CSV files -----------------------------------------------------------------------


def check_choice(name: str, value: str, choices: Iterable[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def drop_or_raise(
    datamodule: ImageTextDataModule,
    table: pd.DataFrame,
    bad: pd.Series,
    setting: str,
    reason: str,
    examples: pd.Series,
) -> pd.DataFrame:
    """The rows of `table` not flagged `bad`, or an error naming some of the bad ones (`examples`).

    `setting` names the DataModule's attribute holding the policy, "error" or "drop", so that the
    error says what to change. A missing image raises FileNotFoundError, anything else ValueError.
    """
    count = int(bad.sum())
    if count and getattr(datamodule, setting) == "error":
        error = FileNotFoundError if setting == "missing_images" else ValueError
        raise error(
            f"{type(datamodule).__name__}: {count} record(s) with {reason}: "
            f"{_some(examples[bad].unique())}; set {setting}='drop' to leave them out"
        )
    return drop_rows(datamodule, table, bad, reason, examples)


def drop_rows(
    datamodule: ImageTextDataModule, table: pd.DataFrame, bad: pd.Series, reason: str, examples: pd.Series
) -> pd.DataFrame:
    """The rows of `table` not flagged `bad`; the others are counted per split (the `split` column)
    through note_dropped, so that no record disappears silently."""
    for split, rows in examples[bad].groupby(table.loc[bad, "split"], sort=False):
        datamodule.note_dropped(split, reason, len(rows), str(rows.iloc[0]))
    return table[~bad]


def read_csv_columns(path: Path, columns: list[str], sep: str = ",") -> pd.DataFrame:
    """A CSV file read as text (no NA parsing: a caption "None" stays that text), checking its columns."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    # utf-8-sig: a byte-order mark, as spreadsheet programs write, must not become part of a column name.
    table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    return require_columns(table, columns, path)


def require_columns(table: pd.DataFrame, columns: list[str], path: Path) -> pd.DataFrame:
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(_missing_columns(path, missing, list(table.columns)))
    return table


def _missing_columns(path: Path, missing: list[str], found: list[str]) -> str:
    return f"{path} has no {', '.join(map(repr, missing))} column; columns found: {found}"


def _roco_id(raw: str) -> str:
    """An ID as the CSV files write it: no surrounding spaces and no .jpg (which some copies add)."""
    raw = str(raw).strip()
    return raw[:-4] if raw.lower().endswith(".jpg") else raw


def _split_cuis(text: str) -> tuple[str, ...]:
    return tuple(cui.strip() for cui in text.split(";") if cui.strip())


# --- Hugging Face exports: parquet and Arrow files embedding the images ----------------------------


def find_hub_files(root: Path) -> list[Path]:
    """The parquet and Arrow files of a downloaded hub dataset: `root` itself or those under it.

    `cache-*.arrow` files are left out: `datasets` writes them beside a saved dataset as the
    results of map() calls, and they are not part of it.
    """
    if root.is_file() and root.suffix in HUB_SUFFIXES:
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.suffix in HUB_SUFFIXES and not p.name.startswith("cache-"))
    files = [p for p in files if p.is_file()]
    if not files:
        raise FileNotFoundError(f"{root} holds no parquet or Arrow files")
    return files


def _hub_split(path: Path) -> str:
    """The split a hub file belongs to, from its name (`validation-00000-of-00002.parquet`) or folder."""
    for name in (path.stem.split("-")[0], path.parent.name):
        if name.lower() in HUB_SPLITS:
            return HUB_SPLITS[name.lower()]
    raise ValueError(
        f"cannot tell the split of {path}: expected a name (or folder) starting with "
        f"{', '.join(sorted(HUB_SPLITS))}"
    )


def _open_arrow(path: Path) -> pa.Table:
    """An Arrow file as a table over a memory map: reading a column copies nothing into memory."""
    source = pa.memory_map(str(path))
    try:
        return pa.ipc.open_file(source).read_all()
    except pa.ArrowInvalid:  # datasets.save_to_disk writes the stream format, without a footer
        source.seek(0)
        return pa.ipc.open_stream(source).read_all()


def _schema_names(path: Path) -> list[str]:
    if path.suffix == ".parquet":
        return pq.read_schema(path).names
    return _open_arrow(path).schema.names


def read_table_columns(path: Path, columns: list[str], optional: Iterable[str] = ()) -> pd.DataFrame:
    """Columns of a hub file as a DataFrame; `image` stands for its `path` field, never its bytes.

    The bytes are the bulk of a file: only write_images and iter_image_bytes read them.
    """
    names = _schema_names(path)
    missing = [c for c in columns if c not in names]
    if missing:
        raise ValueError(_missing_columns(path, missing, names))
    wanted = columns + [c for c in optional if c in names]
    if path.suffix == ".parquet":
        table = pq.ParquetFile(path).read(
            columns=[_image_path_column(path) if c == "image" else c for c in wanted]
        )
    else:
        table = _open_arrow(path).select(wanted)
    data = {c: _image_paths(table.column(c)) if c == "image" else table.column(c).to_pylist() for c in wanted}
    # Object columns: a missing value stays None, where pandas would make it NaN in a text column.
    return pd.DataFrame(data, dtype=object)


def _image_path_column(path: Path) -> str:
    """The parquet column path that reads an `image` struct's `path` field alone (not its bytes)."""
    kind = pq.read_schema(path).field("image").type
    return "image.path" if _is_struct_with(kind, "path") else "image"


def _is_struct_with(kind: Any, field: str) -> bool:
    return pa.types.is_struct(kind) and kind.get_field_index(field) >= 0


def _image_paths(column: Any) -> list[str | None]:
    """The file names images had when the export was made (no folders), or None where unknown."""
    if not _is_struct_with(column.type, "path"):
        return [None] * len(column)
    return [_file_name(p) for p in pc.struct_field(column, "path").to_pylist()]


def _file_name(path: str | None) -> str | None:
    """The last part of a path written on any system, or None for no path."""
    name = re.split(r"[\\/]", path)[-1] if path else ""
    return name or None


def _image_bytes(column: Any) -> Any:
    if _is_struct_with(column.type, "bytes"):
        return pc.struct_field(column, "bytes")
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        return column
    raise ValueError(f"the image column holds {column.type}, neither {{bytes, path}} structs nor bytes")


def _image_chunks(path: Path) -> Iterator[tuple[int, int, Callable[[], Any]]]:
    """(first row, row count, reader of the image column) for each part of the file read at once.

    Parquet files are read a row group at a time, so only one group's images are in memory;
    Arrow files are memory-mapped and read whole, which copies nothing.
    """
    if path.suffix == ".parquet":
        file = pq.ParquetFile(path)
        first = 0
        for group in range(file.num_row_groups):
            count = file.metadata.row_group(group).num_rows
            yield first, count, partial(_read_row_group_images, file, group)
            first += count
    else:
        table = _open_arrow(path)
        yield 0, table.num_rows, lambda: table.column("image")


def _read_row_group_images(file: Any, group: int) -> Any:
    return file.read_row_group(group, columns=["image"]).column("image")


def iter_image_bytes(path: Path, rows: Iterable[int]) -> Iterator[tuple[int, bytes | None]]:
    """(row, encoded image or None) for the given rows of a hub file, in row order."""
    wanted = sorted(set(rows))
    for first, count, read in _image_chunks(path):
        chunk_rows = wanted[bisect.bisect_left(wanted, first) : bisect.bisect_left(wanted, first + count)]
        if chunk_rows:
            values = _image_bytes(read())
            for row in chunk_rows:
                yield row, values[row - first].as_py()


def write_images(path: Path, targets: dict[int, Path]) -> None:
    """Writes the image of each row of `targets` (row -> file) that is not written yet.

    A row without image bytes writes nothing: the caller finds its file missing.
    """
    present = {folder: existing_names(folder) for folder in {target.parent for target in targets.values()}}
    todo = {row: target for row, target in targets.items() if target.name not in present[target.parent]}
    if not todo:
        return
    log.info("writing %d image(s) from %s", len(todo), path)
    for row, data in iter_image_bytes(path, todo):
        if data is not None:
            _write_atomically(todo[row], data)


def existing_names(folder: Path) -> set[str]:
    """The names of the entries of `folder` (none if it does not exist): one listing instead of a
    stat per image, which matters for tens of thousands of images on a network file system."""
    return set(os.listdir(folder)) if folder.is_dir() else set()


def _write_atomically(target: Path, data: bytes) -> None:
    # A name per process: several ranks of one job may write the same image at once.
    target.parent.mkdir(parents=True, exist_ok=True)
    partial_file = target.with_name(f".{target.name}.{os.getpid()}.part")
    partial_file.write_bytes(data)
    os.replace(partial_file, target)
