"""Local copies of Hugging Face hub datasets whose rows embed their images.

A hub export is a folder of parquet files (or of the Arrow files `datasets.save_to_disk` writes)
with an `image` column of {bytes, path} structs. Held in memory, the images of a whole export take
gigabytes: the DataModules read only the small columns into DataFrames, and the images of the
records they keep are written to disk once, as the files those records point to; later runs find
them there.
"""

from __future__ import annotations

import bisect
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .atomic import write_atomically
from .base import SPLITS
from .images import existing_names
from .tables import check_columns

log = logging.getLogger(__name__)

# How hub exports name their splits (file-name prefix or folder name) -> this package's split names.
HUB_SPLITS = {"train": "train", "validation": "val", "valid": "val", "val": "val", "test": "test"}
HUB_SUFFIXES = (".parquet", ".arrow")


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


def hub_files_by_split(root: Path) -> dict[str, list[Path]]:
    """find_hub_files(root) by split ("train", "val", "test"; a split without files has none)."""
    files: dict[str, list[Path]] = {split: [] for split in SPLITS}
    for path in find_hub_files(root):
        files[_hub_split(path)].append(path)
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
    check_columns(path, columns, names)
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
            write_atomically(todo[row], lambda tmp, data=data: tmp.write_bytes(data))


def materialise_images(table: pd.DataFrame, names: pd.Series, folder: Path) -> tuple[list[str], pd.Series]:
    """Writes the image of each row of `table` as `folder/<its name in names>`, unless it is there.

    table: rows read from hub files, with columns `file` and `row` (where the image is) and `where`
        (the row, for messages). Rows sharing a name in one file are one image, written from the
        first of them; a row named "" has no image.
    Returns each row's image file, and what is missing: "<where>: no image bytes" for the rows whose
    file is not there after writing (the export has no bytes for them), else "".
    """
    rows = pd.DataFrame({"file": table["file"], "row": table["row"], "name": names})
    rows = rows[rows["name"] != ""].drop_duplicates(["file", "name"])
    for path, group in rows.groupby("file", sort=False):
        targets = {row: folder / name for row, name in zip(group["row"], group["name"], strict=True)}
        write_images(path, targets)
    found = names.isin(existing_names(folder))
    return [str(folder / name) for name in names], (table["where"] + ": no image bytes").where(~found, "")
