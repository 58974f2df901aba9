"""Training behaviour: learning happens, DDP ranks agree, precision rules hold."""

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules import SyntheticShapesDataModule
from lightning_modules import FineTuning, Optimizer
from lightning_modules.families.stable_diffusion import build_tiny_backbone
from lightning_modules.precision import cast_frozen_parameters

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def cpu_trainer(root: Path, steps: int) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        default_root_dir=root,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=1000,
    )


def test_overfits_a_handful_of_images(tmp_path):
    L.seed_everything(0)
    model = FineTuning(optimizer=Optimizer(lr=1e-3, schedule="constant"))
    # n_val=0: validation runs on the four training images, with fixed noise and timesteps.
    data = SyntheticShapesDataModule(n_train=4, n_val=0, image_size=32, batch_size=4)
    trainer = cpu_trainer(tmp_path, steps=80)
    before = trainer.validate(model, data, verbose=False)[0]["val/loss"]
    trainer.fit(model, data)
    after = trainer.validate(model, data, verbose=False)[0]["val/loss"]
    assert after < 0.5 * before, (before, after)


def test_ddp_ranks_end_with_identical_weights(tmp_path):
    command = [
        sys.executable,
        "-m",
        "experiments.cli",
        "fit",
        "--config",
        str(REPO / "experiments/configs/tiny/unet.yaml"),
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.max_steps",
        "4",
        "--trainer.val_check_interval",
        "2",
        "--trainer.callbacks+=tests.helpers.ddp.SaveTrainableWeights",
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    rank0 = torch.load(tmp_path / "weights-rank0.pt")
    rank1 = torch.load(tmp_path / "weights-rank1.pt")
    assert rank0.keys() == rank1.keys() and rank0
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    base = build_tiny_backbone().unet.state_dict()
    assert any(not torch.equal(v, base[k.removeprefix("unet.")]) for k, v in rank0.items())
    assert (tmp_path / "export" / "model_index.json").is_file()


def test_frozen_parts_go_to_half_precision_and_trained_weights_stay_fp32():
    unet = build_tiny_backbone().unet
    unet.requires_grad_(False)
    unet.conv_in.requires_grad_(True)
    cast = cast_frozen_parameters(unet, torch.bfloat16)
    assert cast == len(list(unet.parameters())) - 2  # all but conv_in's weight and bias
    assert unet.conv_in.weight.dtype == torch.float32
    assert unet.conv_out.weight.dtype == torch.bfloat16


def test_true_half_precision_is_refused(tmp_path):
    model = FineTuning()
    data = SyntheticShapesDataModule(n_train=4, n_val=0, image_size=32, batch_size=4)
    trainer = L.Trainer(
        accelerator="cpu",
        precision="bf16-true",
        max_steps=1,
        logger=False,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
    )
    with pytest.raises(ValueError, match="bf16-mixed"):
        trainer.fit(model, data)
