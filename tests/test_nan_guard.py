"""A diverging run stops with a message naming the step, and writes nothing non-finite."""

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from datamodules.safe_load import load_checkpoint
from lightning_modules import BackboneSpec, FineTuning
from lightning_modules.export import write_export
from lightning_modules.guards import NonFiniteError, NonFiniteGuard, non_finite
from tests.helpers.fit import tiny_fit

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

DIVERGING = ["--model.init_args.optimizer.lr", "1e6"]  # the weights blow up within a few steps


def fit(root: Path, *extra: str) -> None:
    tiny_fit(root, *extra)


def written_tensors(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every checkpoint's and export weight file's tensors under `root`."""
    files = {p: load_checkpoint(p)["state_dict"] for p in root.glob("checkpoints/*.ckpt")}
    files |= {p: load_file(p) for p in root.glob("export/**/*.safetensors")}
    return {str(p): tensors for p, tensors in files.items()}


def test_the_tensors_holding_nan_or_inf_are_named():
    tensors = {"a": torch.zeros(3), "b": torch.tensor([1.0, float("nan")]), "c": torch.tensor([float("inf")])}
    assert non_finite({**tensors, "ids": torch.arange(3)}) == ["b", "c"]


def test_a_diverging_run_stops_at_the_step_and_writes_nothing_non_finite(tmp_path):
    with pytest.raises(NonFiniteError, match=r"^step \d+: the gradient of"):
        fit(tmp_path, *DIVERGING)
    for path, tensors in written_tensors(tmp_path).items():
        assert non_finite(tensors) == [], path
    assert not (tmp_path / "export").exists()  # the fit did not end: no export of blown-up weights


def test_skipped_steps_are_logged_and_the_run_ends_with_finite_weights(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="lightning_modules.guards"):
        fit(tmp_path, *DIVERGING, "--nan_guard.max_skipped_steps", "100")
    skipped = [r.getMessage() for r in caplog.records if "skipped: non-finite gradient" in r.getMessage()]
    assert skipped, "the diverging steps were not skipped"
    files = written_tensors(tmp_path)
    assert any("export" in path for path in files)
    for path, tensors in files.items():
        assert non_finite(tensors) == [], path


def test_a_non_finite_checkpoint_is_refused():
    guard = NonFiniteGuard()
    trainer = type("Trainer", (), {"global_step": 7})()
    module = torch.nn.Linear(2, 1)
    frozen = torch.nn.Linear(2, 1).requires_grad_(False)
    with torch.no_grad():
        frozen.weight.fill_(float("nan"))  # frozen weights are not written: not checked
    module.frozen = frozen
    guard.on_save_checkpoint(trainer, module, {})  # trained weights finite: written
    with torch.no_grad():
        module.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="step 7: not writing a checkpoint"):
        guard.on_save_checkpoint(trainer, module, {})


def test_an_export_is_not_replaced_by_non_finite_weights(tmp_path):
    module = FineTuning(backbone=BackboneSpec("medsd/tiny-sd"), train_unet=True)
    folder = tmp_path / "export"
    write_export(module, folder, 1)
    good = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    with torch.no_grad():
        module.unet.conv_in.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="not writing the export"):
        write_export(module, folder, 2)
    kept = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(kept[k], v) for k, v in good.items())
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no scratch folder left behind
