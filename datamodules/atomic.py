"""Files written whole: a reader (or a rerun after a crash) sees the old file or the new one,
never a truncated one. The lowest layer of the project, so every package can use it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, write: Callable[[Path], object], sync: bool = False) -> None:
    """Call `write(tmp)` then move tmp onto `path`. The temporary name is per process, so ranks
    writing the same file never share one; `sync` flushes it to disk before the move (for files
    whose loss after a power cut would go unnoticed, such as cached statistics)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        if sync:
            with tmp.open("rb+") as file:
                os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
