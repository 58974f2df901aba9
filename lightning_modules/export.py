"""Writing files and a run's export folder atomically, and reading back the one non-standard format."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

MANIFEST = "medsd_export.json"


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a scratch folder that replaces `target` only if the block finishes.

    A crash while exporting leaves the previous export (or none), never a half-written one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield scratch
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            scratch.rename(target)
            shutil.rmtree(old)
        else:
            scratch.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` then move tmp onto `path`: a crash leaves the old file or none, never a
    truncated one. The temporary name is per process, so ranks never share one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_manifest(folder: Path, **fields) -> None:
    """`medsd_export.json`: what the folder holds and how to load it."""
    (folder / MANIFEST).write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: '{folder}' is not a medsd export folder")
    return json.loads(path.read_text())
