"""What the prepared-cache tests share: a tiny folder of generated shapes, its DataModule at
32 px, and a quiet CPU Trainer."""

from pathlib import Path

import lightning as L

from datamodules import CSVImageTextDataModule, write_synthetic_folder


def shapes_folder(tmp_path_factory) -> Path:
    """Eight generated images at 48 px, half of them in the validation split."""
    return write_synthetic_folder(tmp_path_factory.mktemp("shapes"), n=8, size=48, val_fraction=0.5)


def data(csv: Path, **kwargs) -> CSVImageTextDataModule:
    return CSVImageTextDataModule(str(csv), image_size=32, batch_size=4, **kwargs)


def quiet_trainer(root: Path, **kwargs) -> L.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar or summary."""
    return L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root, **kwargs,
    )  # fmt: skip
