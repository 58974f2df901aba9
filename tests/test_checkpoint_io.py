"""Checkpoints and exports are written whole: a failed checkpoint write keeps the previous one,
which then resumes, and leaves no temporary file behind; an export replacement killed half-way
is recovered."""

import errno
import os
import stat
from pathlib import Path

import pytest
import torch

from datamodules.atomic import atomic_directory
from datamodules.safe_load import load_checkpoint
from lightning_modules.checkpoint_io import AtomicCheckpointIO, CheckpointWriteError
from lightning_modules.export import MANIFEST, read_export_manifest, write_export_manifest
from lightning_modules.pipelines import resolve_source
from tests.helpers.fit import tiny_fit

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def fit(root: Path, steps: int, *extra: str) -> None:
    tiny_fit(root, "--trainer.max_steps", str(steps), *extra)


def test_a_save_is_written_beside_its_target_and_renamed(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"w": torch.ones(3)}, tmp_path / "a.ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["a.ckpt"]
    assert torch.equal(load_checkpoint(tmp_path / "a.ckpt")["w"], torch.ones(3))


def test_a_full_disk_keeps_the_previous_checkpoint_which_resumes(tmp_path, monkeypatch):
    fit(tmp_path, 4)
    last = tmp_path / "checkpoints" / "last.ckpt"
    before = last.read_bytes()

    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        # Half a checkpoint reaches the disk, then the device is full.
        real_save({"partial": torch.zeros(10)}, f)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointWriteError, match=r"No space left on device\): it needs about \d+ MiB"):
        fit(tmp_path, 8, "--ckpt_path", "last")
    monkeypatch.setattr(torch, "save", real_save)

    assert last.read_bytes() == before  # untouched, not truncated
    assert not [p for p in last.parent.iterdir() if p.name.endswith(".tmp")]
    assert load_checkpoint(last)["global_step"] == 4
    fit(tmp_path, 8, "--ckpt_path", "last")
    assert load_checkpoint(last)["global_step"] == 8


def test_an_export_replacement_killed_between_its_renames_is_recovered(tmp_path):
    """A kill after the previous export was renamed aside and before the new one arrived leaves
    `.export.old` and a scratch folder: the next reader or writer puts the previous one back and
    removes the scratch; exports get the umask's modes, not mkdtemp's 0700."""
    run = tmp_path / "run"
    aside, scratch = run / ".export.old", run / ".export.k1ll3d"
    aside.mkdir(parents=True)
    (aside / MANIFEST).write_text('{"strategy": "FineTuning"}')
    (scratch / "unet").mkdir(parents=True)
    assert resolve_source(run) == (run / "export").resolve()
    assert read_export_manifest(run / "export")["strategy"] == "FineTuning"
    assert sorted(p.name for p in run.iterdir()) == ["export"]

    (run / ".export.again").mkdir()
    with atomic_directory(run / "export") as folder:
        write_export_manifest(folder, strategy="LoRAFineTuning")
    assert sorted(p.name for p in run.iterdir()) == ["export"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((run / "export").stat().st_mode) == 0o777 & ~umask
