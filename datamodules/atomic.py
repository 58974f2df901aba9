"""Files and folders written whole: a reader (or a rerun after a crash) sees the old one or the
new one, never a truncated one. The lowest layer of the project, so every package can use it."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

# write_atomically's temporary files, `.<target name>.<pid>.tmp`: what a kill mid-write leaves.
TEMPORARY_GLOB = ".*.tmp"


def write_atomically(path: Path, write: Callable[[Path], object], sync: bool = False) -> None:
    """Call `write(tmp)` then move tmp onto `path`. The temporary name is per process, so ranks
    writing the same file never share one; `sync` flushes it to disk before the move (for files
    whose loss after a power cut would go unnoticed, such as cached statistics)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # matches TEMPORARY_GLOB
    try:
        write(tmp)
        if sync:
            with tmp.open("rb+") as file:
                os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a scratch folder that replaces `target` only if the block finishes.

    A crash while writing leaves the previous folder (or none), never a half-written one: a
    run's export, a prepared cache, a phantom dataset. A folder cannot be swapped in one step:
    the previous one is renamed aside first, and a kill between the two renames leaves it there,
    which `recover_interrupted` (run here first, and by every reader of a run's export) puts
    back. The folder gets the modes the umask gives.
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
