"""A run's export folder: its manifest, written and read back (the folder itself is written whole
with datamodules.atomic.atomic_directory)."""

from __future__ import annotations

import json
from pathlib import Path

MANIFEST = "medsd_export.json"


def write_export_manifest(folder: Path, **fields) -> None:
    """`medsd_export.json`: what the folder holds and how to load it."""
    (folder / MANIFEST).write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")


def read_export_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: '{folder}' is not a medsd export folder")
    return json.loads(path.read_text())
