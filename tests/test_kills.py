"""kill -9 at the moments that could cut a write: the run then resumes from its newest complete
checkpoint, ends bit-identical to the uninterrupted run and exports; there is always exactly one
best checkpoint, and what the kill left behind is cleaned up.

tiny/unet.yaml runs 4 batches an epoch, validated and checkpointed after each (steps 4, 8, 12);
its validation loss falls at each of them, so each writes best.ckpt, then last.ckpt.
"""

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from experiments.cli import main as medsd
from lightning_modules.run_checkpoints import RunCheckpoint
from tests.helpers.fit import tiny_fit, tiny_fit_args
from tests.helpers.kill import run_killed

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

UNET = Path("export") / "unet" / "diffusion_pytorch_model.safetensors"


def steps(n: int) -> tuple[str, str]:
    return "--trainer.max_steps", str(n)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    root = tmp_path_factory.mktemp("whole")
    tiny_fit(root, *steps(12))
    return load_file(root / UNET)


def checkpoints(root: Path) -> dict[str, int]:
    """Every file of the run's checkpoint folder -> its step (-1 for a file that is no checkpoint)."""
    found = {}
    for path in sorted((root / "checkpoints").iterdir()):
        is_checkpoint = path.suffix == ".ckpt"
        found[path.name] = torch.load(path, weights_only=True)["global_step"] if is_checkpoint else -1
    return found


def resume_to_12(root: Path, caplog) -> str:
    """Resume with `--ckpt_path last`; returns the name of the checkpoint it restored."""
    with caplog.at_level(logging.INFO):
        tiny_fit(root, *steps(12), "--ckpt_path", "last")
    (restored,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Restored all states")]
    return Path(restored.split()[-1]).name


def assert_equal_weights(root: Path, expected: dict[str, torch.Tensor]) -> None:
    weights = load_file(root / UNET)
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in weights)


def test_killed_at_the_first_save_between_best_and_last_resumes_from_best(tmp_path, uninterrupted, caplog):
    run_killed("before", "last.ckpt", 1, *tiny_fit_args(tmp_path, *steps(12)))
    left = checkpoints(tmp_path)
    assert left.pop("best.ckpt") == 4
    # The kill cut last.ckpt's write: only its temporary exists. Lightning's own `last` would
    # find no last.ckpt and start again from step 0.
    (temporary,) = left
    assert temporary.startswith(".last.ckpt.") and temporary.endswith(".tmp")

    assert resume_to_12(tmp_path, caplog) == "best.ckpt"
    assert checkpoints(tmp_path) == {"best.ckpt": 12, "last.ckpt": 12}  # the temporary is gone
    assert_equal_weights(tmp_path, uninterrupted)
    medsd(["export", str(tmp_path)])
    assert (tmp_path / "export-best" / "medsd_export.json").is_file()


def test_killed_at_step_8_after_the_new_best_resumes_from_it_bit_identical(tmp_path, uninterrupted, caplog):
    run_killed("after", "best.ckpt", 2, *tiny_fit_args(tmp_path, *steps(12)))
    # One best, the new one, by construction: it replaced the old one in a single rename.
    assert checkpoints(tmp_path) == {"best.ckpt": 8, "last.ckpt": 4}
    assert resume_to_12(tmp_path, caplog) == "best.ckpt"
    assert_equal_weights(tmp_path, uninterrupted)
    medsd(["export", str(tmp_path), "--checkpoint", "last"])
    assert_equal_weights(tmp_path, load_file(tmp_path / "export-last" / "unet" / UNET.name))


def test_killed_while_replacing_the_export_resumes_and_exports(tmp_path, uninterrupted, caplog):
    tiny_fit(tmp_path, *steps(8))
    # The resumed run's export: the step-8 export is renamed aside, then the kill.
    run_killed("after", ".export.old", 1, *tiny_fit_args(tmp_path, *steps(12), "--ckpt_path", "last"))
    names = {p.name for p in tmp_path.iterdir() if "export" in p.name}
    (scratch,) = names - {".export.old"}  # no export/: the previous one aside, the new one in scratch
    assert ".export.old" in names and scratch.startswith(".export.")

    assert resume_to_12(tmp_path, caplog) == "last.ckpt"
    assert sorted(p.name for p in tmp_path.iterdir() if "export" in p.name) == ["export"]
    assert_equal_weights(tmp_path, uninterrupted)


def test_a_fresh_fit_into_an_earlier_runs_checkpoints_is_refused(tmp_path):
    tiny_fit(tmp_path, *steps(4))
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    refused = r"holds the checkpoints of an earlier run \(best.ckpt, last.ckpt\)"
    with pytest.raises(RuntimeError, match=refused):
        tiny_fit(tmp_path, *steps(4))
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_a_moved_run_folder_keeps_its_best_score(tmp_path):
    old, new = "/data/old/run/checkpoints", str(tmp_path / "checkpoints")
    callback = RunCheckpoint(dirpath=new, monitor="val/loss")
    callback.load_state_dict(
        {
            "monitor": "val/loss",
            "best_model_score": torch.tensor(0.25),
            "best_model_path": f"{old}/best.ckpt",
            "current_score": torch.tensor(0.5),
            "dirpath": old,
            "best_k_models": {f"{old}/best.ckpt": torch.tensor(0.25)},
            "kth_best_model_path": f"{old}/best.ckpt",
            "kth_value": torch.tensor(0.25),
            "last_model_path": f"{old}/last.ckpt",
        }
    )
    assert callback.best_model_path == callback.kth_best_model_path == f"{new}/best.ckpt"
    assert callback.best_k_models == {f"{new}/best.ckpt": torch.tensor(0.25)}
    assert callback.best_model_score == 0.25 and callback.last_model_path == f"{new}/last.ckpt"
