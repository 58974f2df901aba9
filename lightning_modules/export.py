"""A run's export folder: the trained model and its manifest, written whole (with
datamodules.atomic.atomic_directory) at the end of every fit, and the manifest read back."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from datamodules.atomic import atomic_directory

from .backbones import random_base_fields
from .guards import refuse_non_finite_weights
from .sharding import is_sharded
from .trained_weights import ema_weights, load_trained

if TYPE_CHECKING:
    from .diffusion import DiffusionModule

log = logging.getLogger(__name__)

MANIFEST = "medsd_export.json"
EMBEDDINGS_FILE = "learned_embeds.safetensors"  # a textual inversion export's learned tokens


def write_export_manifest(folder: Path, **fields) -> None:
    """`medsd_export.json`: what the folder holds and how to load it."""
    (folder / MANIFEST).write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")


def read_export_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: '{folder}' is not a medsd export folder")
    return json.loads(path.read_text())


def export_at_fit_end(module: DiffusionModule) -> None:
    """The export every fit ends with, under `<default_root_dir>/export` (rank 0 writes)."""
    trainer = module.trainer
    folder = Path(trainer.default_root_dir) / "export"
    if is_sharded(trainer):
        # Each rank holds 1/N of the weights: gather the trained ones onto rank 0 (a collective,
        # so every rank calls it) and export from an unsharded copy.
        state = trainer.strategy.lightning_module_state_dict()
        if trainer.is_global_zero:
            write_export(unsharded_copy(module, state), folder, module.global_step)
    elif trainer.is_global_zero:
        write_export(module, folder, module.global_step)
    trainer.strategy.barrier("medsd-export")


def write_export(module: DiffusionModule, folder: Path, global_step: int) -> None:
    """The module's export (EMA weights if kept) and its manifest, written whole into `folder`."""
    spec = module.backbone_spec
    with ema_weights(module):
        write_export_folder(
            module,
            folder,
            module.export,
            family=module.family.name,
            base_model=spec.name_or_path,
            base_revision=spec.revision,
            global_step=global_step,
            ema=module.ema is not None,
            **random_base_fields(spec),
        )


def write_export_folder(module: nn.Module, folder: Path, write: Callable[[Path], dict], **fields) -> None:
    """`write(scratch)` (returning more manifest fields) and the manifest with `fields` and the
    module's class as its strategy, written whole into `folder`; refused (the previous export
    kept) if a trained weight of `module` is not finite."""
    refuse_non_finite_weights(module, f"the export {folder}")
    with atomic_directory(folder) as scratch:
        write_export_manifest(scratch, **write(scratch), **fields, strategy=type(module).__name__)
    log.info("exported %s to %s", type(module).__name__, folder)


def unsharded_copy(module: DiffusionModule, state_dict: dict[str, torch.Tensor]) -> DiffusionModule:
    """The module's strategy built again from its hyperparameters (the backbone reloaded, on the
    CPU), with the trained weights of `state_dict`, a full state dict of the module."""
    copy = type(module)(**module.hparams)
    load_trained(copy, {"state_dict": state_dict})
    return copy.eval()
