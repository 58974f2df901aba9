"""Checkpoints written whole, in their own folder: a full disk or a kill never costs the last one.

Lightning's default writer saves into a temporary file through fsspec, which on a local disk
sits in the system's temporary folder; moving it into the run folder is then a copy, and a full
run folder leaves the checkpoint truncated (and unloadable) where the previous one was.
`AtomicCheckpointIO` (every `medsd fit` gets it) writes next to the target, flushes to disk and
renames, so a reader sees the previous checkpoint or the new one; a failed write removes its
temporary file and stops the run with one line saying how much space the checkpoint needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from datamodules.atomic import write_atomically


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the previous file at its path is unchanged."""


def tensor_bytes(value: Any) -> int:
    """The bytes of every tensor in a (nested) checkpoint: about its size on disk."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(tensor_bytes(v) for v in value)
    return 0


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        try:
            write_atomically(path, lambda tmp: torch.save(checkpoint, tmp), sync=True)
        except OSError as error:
            raise CheckpointWriteError(
                f"could not write the checkpoint {path} ({error.strerror or error}): it needs about "
                f"{tensor_bytes(checkpoint) / 2**20:.0f} MiB in {path.parent}; the previous {path.name}, "
                "if any, is unchanged"
            ) from None
