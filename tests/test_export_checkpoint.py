"""`medsd export`: a run's export written from its best or last checkpoint."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from experiments.cli import main as medsd
from experiments.export_checkpoint import checkpoint_export
from experiments.lightning_cli import MedsdCLI

CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "tiny" / "unet.yaml"

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


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
    best = run / "checkpoints" / "best.ckpt"
    medsd(["export", str(run)])
    export = run / "export-best"
    checkpoint = torch.load(best, map_location="cpu", weights_only=True)
    assert manifest(export)["global_step"] == checkpoint["global_step"] and manifest(export)["ema"] is True
    # The exported U-Net holds the EMA shadow of every trained weight, in parameter order.
    names = [k.removeprefix("unet.") for k in checkpoint["state_dict"]]
    weights = unet_weights(export)
    shadow = checkpoint["ema"]["shadow_params"]
    assert len(names) == len(shadow) == len(weights)
    assert all(torch.equal(weights[name], value) for name, value in zip(names, shadow, strict=True))


def test_a_folder_that_is_not_a_run_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        medsd(["export", str(tmp_path)])


def test_sample_takes_a_checkpoint_and_exports_it_once(run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a bright circle on the left\na bright square on the right\n")
    fixed = ["--prompts", str(prompts), "--steps", "2", "--seed", "1", "--batch-size", "2"]
    medsd(["sample", str(run), "--checkpoint", "last", "--out", str(tmp_path / "a"), *fixed])
    export = run / "export-last"
    written = (export / "medsd_export.json").stat().st_mtime_ns
    assert json.loads((tmp_path / "a" / "sample_config.json").read_text())["source"] == str(export)
    # A second run reuses the export, and sampling the export folder directly gives the same images.
    medsd(["sample", str(run), "--checkpoint", "last", "--out", str(tmp_path / "b"), *fixed])
    medsd(["sample", str(export), "--out", str(tmp_path / "c"), *fixed])
    assert (export / "medsd_export.json").stat().st_mtime_ns == written
    images = [sorted((tmp_path / out / "images").glob("*.png")) for out in "abc"]
    assert len(images[0]) == 2
    assert all(
        p.read_bytes() == q.read_bytes()
        for other in images[1:]
        for p, q in zip(images[0], other, strict=True)
    )


def test_several_ranks_need_the_export_written_first(run):
    shutil.rmtree(run / "export-best", ignore_errors=True)
    with pytest.raises(RuntimeError, match="medsd export"):
        checkpoint_export(run, "best", world_size=2)
