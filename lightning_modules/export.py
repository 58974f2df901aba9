"""Writing a run's export folder atomically, and reading back its manifest."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST = "medsd_export.json"


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a scratch folder that replaces `target` only if the block finishes.

    A crash while exporting leaves the previous export (or none), never a half-written one. A
    folder cannot be swapped in one step: the previous one is renamed aside first, and a kill
    between the two renames leaves it there, which `recover_interrupted` (run here first, and by
    every reader of a run's export) puts back. The folder gets the modes the umask gives.
    """
    target = Path(target)
    recover_interrupted(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    scratch.chmod(0o777 & ~umask)  # mkdtemp makes it 0700
    try:
        yield scratch
        if target.exists():
            old = _aside(target)
            target.rename(old)
            scratch.rename(target)
            shutil.rmtree(old)
        else:
            scratch.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _aside(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def recover_interrupted(target: str | Path) -> None:
    """After a kill during `atomic_directory`: the previous folder back in place if the new one
    never arrived, and the killed writer's scratch folders removed."""
    target = Path(target)
    old = _aside(target)
    if old.is_dir() and not target.exists():
        old.rename(target)
        log.warning("%s: an interrupted replacement left it aside; the previous one is back", target)
    for stale in target.parent.glob(f".{target.name}.*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def write_manifest(folder: Path, **fields) -> None:
    """`medsd_export.json`: what the folder holds and how to load it."""
    (folder / MANIFEST).write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: '{folder}' is not a medsd export folder")
    return json.loads(path.read_text())
