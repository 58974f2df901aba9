"""`medsd export`: a run's export written from its best or last checkpoint."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from experiments.cli import MedsdCLI
from experiments.cli import main as medsd

CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "tiny" / "unet.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """Tiny full U-Net fine-tuning with EMA, 8 steps over two validated epochs."""
    root = tmp_path_factory.mktemp("unet")
    MedsdCLI(args=["fit", "--config", str(CONFIG), "--trainer.default_root_dir", str(root),
                   "--trainer.max_steps", "8", "--model.init_args.validation.prompts", "[]"])  # fmt: skip
    return root


def unet_weights(export: Path) -> dict[str, torch.Tensor]:
    return load_file(export / "unet" / "diffusion_pytorch_model.safetensors")


def manifest(export: Path) -> dict:
    return json.loads((export / "medsd_export.json").read_text())


def test_the_last_checkpoint_exports_what_the_fit_exported(run, tmp_path):
    medsd(["export", str(run), "--checkpoint", "last", "--out", str(tmp_path / "last")])
    ours, fits = unet_weights(tmp_path / "last"), unet_weights(run / "export")
    assert ours.keys() == fits.keys() and all(torch.equal(ours[k], fits[k]) for k in ours)
    assert manifest(tmp_path / "last") == manifest(run / "export")


def test_the_best_checkpoint_exports_its_ema_weights(run):
    (best,) = (run / "checkpoints").glob("best-*.ckpt")
    medsd(["export", str(run)])
    export = run / f"export-{best.stem}"
    step = int(re.fullmatch(r"best-step(\d+)", best.stem).group(1))
    assert manifest(export)["global_step"] == step and manifest(export)["ema"] is True
    # The exported U-Net holds the EMA shadow of every trained weight, in parameter order.
    checkpoint = torch.load(best, map_location="cpu", weights_only=False)
    names = [k.removeprefix("unet.") for k in checkpoint["state_dict"]]
    weights = unet_weights(export)
    shadow = checkpoint["ema"]["shadow_params"]
    assert len(names) == len(shadow) == len(weights)
    assert all(torch.equal(weights[name], value) for name, value in zip(names, shadow, strict=True))


def test_a_folder_that_is_not_a_run_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        medsd(["export", str(tmp_path)])
