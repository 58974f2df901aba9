"""The record index: a DataModule's records built once per dataset and settings, read by later starts.

Building MIMIC-CXR's records means reading its tables and a report file per study and sectioning
each: minutes at the release's size, on every start, in every DDP rank and every sweep cell. The
first start stores what it built; later starts (`fit`, `inspect-data`, `prepare`, every rank) read
it back in seconds once they have checked that no file it was built from has changed.

Layout, under the index folder (`record_index_dir`; default $MEDSD_CACHE_DIR/record-index, else
$XDG_CACHE_HOME/medsd/record-index, else ~/.cache/medsd/record-index):

    <DataModule class>-<key>/current           the name of the build in use, replaced atomically
    <DataModule class>-<key>/<build>/records.arrow    one row per record: split, image, prompt,
                                               label:<name> and meta:<key> columns
    <DataModule class>-<key>/<build>/sources.arrow    every file the build read (or looked for):
                                               path, size (-1: absent), mtime_ns, and for tables
                                               the digest of their content
    <DataModule class>-<key>/<build>/manifest.json    the settings, the records dropped and why
    <DataModule class>-<key>/<build>/tokens-<tokenizer>.arrow   each record's prompt length in
                                               that tokenizer's tokens, written once per tokenizer

The key digests the DataModule's class, its settings that change records, the working folder
(relative paths resolve against it) and the source code of the `datamodules` package, so another
setting reads another index and a code change rebuilds. A source whose size, modification time or
(for tables) content differs rebuilds the index, logged with the file that changed.

Tables are compared by content because a file rewritten within one tick of the file system's clock
keeps its modification time; per-record files (MIMIC's 227,835 reports) by size and modification
time only, as reading them all back would cost what the index saves. Image files are not sources:
one that disappears later is met by the DataModule's bad_images policy when it is read.

Concurrency: a build happens under `<index>/lock`, an OS file lock that dies with its process; a
process that finds the lock taken waits, then reads what the holder built. Readers take no lock:
a build is written aside and swapped in with one rename, and a file already opened stays readable.
Under `medsd fit`, Lightning calls prepare_data on each node's rank 0 before the other ranks'
setup, so rank 0 builds and the others read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISDIR
from typing import Any

import numpy as np
import pyarrow as pa
from filelock import FileLock, Timeout

from .atomic import write_atomically

log = logging.getLogger(__name__)

FORMAT = 1
CURRENT = "current"
RECORDS = "records.arrow"
SOURCES = "sources.arrow"
MANIFEST = "manifest.json"
LABEL = "label:"
META = "meta:"
ABSENT = -1  # the size of a source that did not exist when the index was built
FOLDER = -2  # the size of a source that was a folder
RACY_NS = 3_000_000_000
ABSENT_VALUE = object()  # a label or meta key a record does not have
PACKAGE = Path(__file__).resolve().parent


def default_index_dir() -> Path:
    if os.environ.get("MEDSD_CACHE_DIR"):
        return Path(os.environ["MEDSD_CACHE_DIR"]) / "record-index"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "medsd" / "record-index"


def digest(data: str | bytes) -> str:
    return hashlib.blake2b(data.encode() if isinstance(data, str) else data, digest_size=16).hexdigest()


def file_digest(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as file:
        while block := file.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def code_digest(cls: type) -> str:
    """The source of the `datamodules` package and of the file defining `cls` (a user's subclass)."""
    files = sorted(PACKAGE.glob("*.py"))
    defined_in = Path(__import__(cls.__module__, fromlist=["_"]).__file__).resolve()
    if defined_in.parent != PACKAGE:
        files.append(defined_in)
    return digest(b"".join(path.read_bytes() for path in files))


# --- what the index is built from ---------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """A file a build read or looked for, as it was: its size (ABSENT, FOLDER), modification time
    and, for tables and files modified just before the build, the digest of its content."""

    path: str
    size: int
    mtime_ns: int
    digest: str | None

    @classmethod
    def of(cls, path: str, table: bool) -> Source:
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            return cls(path, ABSENT, 0, None)
        if S_ISDIR(stat.st_mode):  # its listing was read: entries added or removed change its time
            return cls(path, FOLDER, stat.st_mtime_ns, None)
        # A file written within a clock tick of a later rewrite keeps its time (racy): by content.
        racy = time.time_ns() - stat.st_mtime_ns < RACY_NS
        return cls(path, stat.st_size, stat.st_mtime_ns, file_digest(path) if table or racy else None)

    def change(self) -> str | None:
        """How the file differs from when it was recorded ("modified", "gone", ...), or None."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return None if self.size == ABSENT else "gone"
        if self.size == ABSENT:
            return "appeared"
        if S_ISDIR(stat.st_mode) != (self.size == FOLDER):
            return "replaced"
        if self.size == FOLDER:  # entries added or removed
            return None if stat.st_mtime_ns == self.mtime_ns else "modified"
        if stat.st_size != self.size:
            return "changed size"
        if self.digest is not None:
            return None if file_digest(self.path) == self.digest else "modified"
        return None if stat.st_mtime_ns == self.mtime_ns else "modified"


def sources_table(sources: dict[str, bool]) -> pa.Table:
    """path -> table? as the sources.arrow table."""
    rows = [Source.of(path, table) for path, table in sources.items()]
    return pa.table(
        {
            "path": [s.path for s in rows],
            "size": pa.array([s.size for s in rows], pa.int64()),
            "mtime_ns": pa.array([s.mtime_ns for s in rows], pa.int64()),
            "digest": pa.array([s.digest for s in rows], pa.string()),
        }
    )


def first_change(table: pa.Table) -> tuple[int, str | None]:
    """(number of sources that changed, the first of them and how) of a sources.arrow table."""
    paths, sizes, times = (table.column(c).to_pylist() for c in ("path", "size", "mtime_ns"))
    digests = table.column("digest").to_pylist()
    changed = 0
    example = None
    for path, size, mtime_ns, content in zip(paths, sizes, times, digests, strict=True):
        how = Source(path, size, mtime_ns, content).change()
        if how is not None:
            changed += 1
            example = example or f"{path} ({how})"
    return changed, example


# --- records as columns -------------------------------------------------------------------------


def records_table(records_by_split: dict[str, list]) -> pa.Table:
    """The records of every split as one table (their order kept): split, image, prompt, then a
    column per label name and meta key. A label absent from a record is null, a blank one NaN, so
    both come back as they were; `labelled` / `described` say whether it had labels / meta at all."""
    rows = [(split, r) for split, records in records_by_split.items() for r in records]
    labels = list(dict.fromkeys(n for _, r in rows for n in (r.labels or ())))
    meta = list(dict.fromkeys(k for _, r in rows for k in (r.meta or ())))
    columns: dict[str, Any] = {
        "split": pa.array([s for s, _ in rows], pa.string()).dictionary_encode(),
        "image": pa.array([r.image for _, r in rows], pa.string()),
        "prompt": pa.array([r.prompt for _, r in rows], pa.string()),
        "labelled": pa.array([r.labels is not None for _, r in rows], pa.bool_()),
        "described": pa.array([r.meta is not None for _, r in rows], pa.bool_()),
    }
    if {tuple(r.labels) for _, r in rows if r.labels is not None} == {tuple(labels)}:
        # Every labelled record has every label (MIMIC's 14): one array, None becoming NaN.
        values = np.array(
            [list(r.labels.values()) if r.labels else [np.nan] * len(labels) for _, r in rows], float
        )
        columns.update({LABEL + name: pa.array(values[:, i]) for i, name in enumerate(labels)})
    else:
        for name in labels:
            values = [(r.labels or {}).get(name, ABSENT_VALUE) for _, r in rows]
            columns[LABEL + name] = pa.array(
                [None if v is ABSENT_VALUE else np.nan if v is None else float(v) for v in values],
                pa.float64(),
            )
    for key in meta:
        columns[META + key] = pa.array([(r.meta or {}).get(key) for _, r in rows], pa.string())
    return pa.table(columns)


def table_records(table: pa.Table, record: Callable[..., Any]) -> dict[str, list]:
    """The records of a records_table, by split; `record` builds one (Record)."""
    n = table.num_rows
    splits = table.column("split").to_pylist()
    images, prompts = table.column("image").to_pylist(), table.column("prompt").to_pylist()
    labels = _dicts(table, LABEL, table.column("labelled").to_pylist(), _label_values, share=True)
    meta = _dicts(table, META, table.column("described").to_pylist(), _meta_values)
    out: dict[str, list] = {}
    for i in range(n):
        out.setdefault(splits[i], []).append(record(images[i], prompts[i], labels[i], meta[i]))
    return out


def _label_values(column: pa.ChunkedArray) -> list:
    """A label column as Python values: NaN (blank) -> None, null (absent) -> ABSENT_VALUE."""
    values = column.to_numpy(zero_copy_only=False).astype(object)
    values[np.isnan(column.fill_null(0).to_numpy(zero_copy_only=False))] = None
    values[column.is_null().to_numpy(zero_copy_only=False)] = ABSENT_VALUE
    return values.tolist()


def _meta_values(column: pa.ChunkedArray) -> list:
    """A meta column as Python strings (null, absent: ABSENT_VALUE), equal values one object."""
    shared: dict = {None: ABSENT_VALUE}
    return [shared.setdefault(v, v) for v in column.to_pylist()]


def _dicts(
    table: pa.Table, prefix: str, present: list[bool], values: Callable, share: bool = False
) -> list[dict | None]:
    """The per-record dicts of the columns named `prefix`<key>; with `share`, records with equal
    values share one (see Record: labels repeat; meta, holding ids, does not)."""
    names = [c for c in table.column_names if c.startswith(prefix)]
    keys = [c[len(prefix) :] for c in names]
    columns = [values(table.column(c)) for c in names]
    rows = zip(*columns, strict=True) if columns else [()] * len(present)
    shared: dict[tuple, dict] = {}
    out: list[dict | None] = []
    for p, row in zip(present, rows, strict=True):
        if not p:
            out.append(None)
        elif share and (same := shared.get(row)) is not None:
            out.append(same)
        else:
            out.append(
                shared.setdefault(
                    row, {k: v for k, v in zip(keys, row, strict=True) if v is not ABSENT_VALUE}
                )
            )
    return out


# --- the index folder ---------------------------------------------------------------------------


def write_arrow(path: Path, table: pa.Table) -> None:
    def write(tmp: Path) -> None:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)

    write_atomically(path, write)


def read_arrow(path: Path) -> pa.Table:
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).read_all()


@dataclass
class Built:
    """What an index holds, read back: the records by split, the drops, and its build folder."""

    records: dict[str, list]
    drops: list[dict[str, Any]]
    folder: Path


class RecordIndex:
    """The index folder of one DataModule class and key (see the module's docstring)."""

    def __init__(self, root: str | os.PathLike, name: str, key: str):
        self.folder = Path(root) / f"{name}-{key}"

    def read(self, record: Callable[..., Any], quiet: bool = False) -> Built | None:
        """The current build if every source is unchanged; None (logged unless `quiet`) if there is
        none or it is out of date."""
        for _ in range(3):  # a build swapped in between reading `current` and opening its files
            build = self._current()
            if build is None:
                if not quiet:
                    log.info("record index %s: none yet for these settings; building it", self.folder)
                return None
            try:
                changed, example = first_change(read_arrow(build / SOURCES))
                if changed:
                    if not quiet:
                        log.warning(
                            "record index %s: %d of the files it was built from changed since, e.g. %s; "
                            "rebuilding it",
                            self.folder,
                            changed,
                            example,
                        )
                    return None
                manifest = json.loads((build / MANIFEST).read_text())
                records = table_records(read_arrow(build / RECORDS), record)
            except FileNotFoundError:
                continue
            log.info("record index %s: read %s", build, {s: len(r) for s, r in records.items()})
            return Built(records, manifest["dropped"], build)
        return None

    def write(
        self, records: dict[str, list], drops: list[dict[str, Any]], sources: dict[str, bool], settings: dict
    ) -> Path:
        """Store a build and make it the current one; the builds it replaces are removed."""
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}"
        scratch = self.folder / f".{name}"
        scratch.mkdir(parents=True)
        write_arrow(scratch / RECORDS, records_table(records))
        write_arrow(scratch / SOURCES, sources_table(sources))
        manifest = {"format": FORMAT, "settings": settings, "dropped": drops, "sources": len(sources)}
        (scratch / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str) + "\n")
        scratch.rename(self.folder / name)
        write_atomically(self.folder / CURRENT, lambda tmp: tmp.write_text(name + "\n"))
        for old in self.folder.iterdir():
            if old.is_dir() and old.name != name:
                shutil.rmtree(old, ignore_errors=True)
        log.info("record index %s: built %s", self.folder / name, {s: len(r) for s, r in records.items()})
        return self.folder / name

    def read_or_build(self, record: Callable[..., Any], build: Callable[[], Built]) -> tuple[Built, bool]:
        """(the index's contents, whether this process built them)."""
        seen = self._current()
        built = self.read(record)
        if built is not None:
            return built, False
        with waiting(index_lock(self.folder), f"another process is building the record index {self.folder}"):
            # Another process may have built it meanwhile. A build found out of date above that is
            # still the current one is not checked again: its sources can be 228k files.
            if self._current() != seen:
                built = self.read(record, quiet=True)
                if built is not None:
                    return built, False
            return build(), True

    def _current(self) -> Path | None:
        try:
            name = (self.folder / CURRENT).read_text().strip()
        except FileNotFoundError:
            return None
        return self.folder / name


def index_lock(folder: Path) -> FileLock:
    """The lock of an index folder (its builds and token counts), released if its holder dies."""
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / "lock"))


class waiting:
    """A lock taken, saying once (logged) that the process waits when another holds it."""

    def __init__(self, lock: FileLock, message: str):
        self.lock, self.message = lock, message

    def __enter__(self) -> FileLock:
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            log.info("%s; waiting for it", self.message)
            self.lock.acquire()
        return self.lock

    def __exit__(self, *exc) -> None:
        self.lock.release()


# --- token lengths ------------------------------------------------------------------------------


def token_lengths(
    folder: Path, tokenizer: Any, prompts: Iterable[str], count: Callable[[list[str]], list[int]]
) -> np.ndarray:
    """Each prompt's length in `tokenizer`'s tokens, from `folder`'s tokens file for the tokenizer's
    fingerprint, or counted (under the index's lock, once for all processes) and stored there."""
    path = folder / f"tokens-{tokenizer.fingerprint}.arrow"
    if not path.is_file():
        with waiting(index_lock(folder.parent), f"another process is counting tokens into {path}"):
            if not path.is_file():
                lengths = pa.array(count(list(prompts)), pa.int32())
                write_arrow(path, pa.table({"tokens": lengths}))
                log.info("record index %s: prompt lengths counted with %s", folder, type(tokenizer).__name__)
    return read_arrow(path).column("tokens").to_numpy()
