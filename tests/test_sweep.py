"""`medsd sweep`: matrix expansion and naming, statuses, resume after a kill, summary."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from experiments import sweep_launchers
from experiments.cli import main as medsd
from experiments.matrix import Matrix, slug
from experiments.sweep import in_sweep, plan, run_prepare, stage_args
from tests.helpers.evaluation import random_inception_weights

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "experiments" / "configs" / "tiny"


def write_matrix(folder: Path, spec: dict) -> Path:
    path = folder / "matrix.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# --- expansion, rules, names -----------------------------------------------------------------


def test_product_minus_exclusions_plus_inclusions_in_order(tmp_path):
    spec = {
        "base": ["base.yaml"],
        "axes": {
            "strategy": {
                "unet": {"config": "unet.yaml"},
                "lora": {"config": ["lora.yaml"], "model.init_args.rank": 8},
            },
            "lr": {"key": "model.init_args.optimizer.lr", "values": [1.0e-3, 1.0e-2]},
        },
        "exclude": [{"lr": 0.01}],
        "include": [{"strategy": "lora", "lr": 0.01}],
    }
    cells = Matrix.load(write_matrix(tmp_path, spec)).cells()
    assert [c.name for c in cells] == [
        "strategy-unet__lr-0.001",
        "strategy-lora__lr-0.001",
        "strategy-lora__lr-0.01",
    ]
    folder = str(tmp_path.resolve())
    assert list(cells[2].fit_args) == [
        "--config", f"{folder}/base.yaml",
        "--config", f"{folder}/lora.yaml", "--model.init_args.rank", "8",
        "--model.init_args.optimizer.lr", "0.01",
    ]  # fmt: skip
    assert dict(cells[0].labels) == {"strategy": "unet", "lr": "0.001"}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"axes": {}}, "at least one axis"),
        ({"exclude": [{"size": "big"}]}, "unknown axis 'size'"),
        ({"exclude": [{"strategy": "vae"}]}, "'vae' is not a label of axis 'strategy'"),
        ({"include": [{"strategy": "unet"}]}, "must name a label for every axis"),
        ({"axes": {"lr": {"key": "model.init_args.optimizer.lr"}}}, "exactly 'key' and a list"),
        ({"sweep": 1}, "unknown key"),
    ],
)
def test_bad_matrices_are_refused_with_the_reason(tmp_path, change, message):
    spec = {"axes": {"strategy": {"unet": {}, "lora": {}}, "lr": {"key": "k", "values": [1]}}, **change}
    with pytest.raises(ValueError, match=message):
        Matrix.load(write_matrix(tmp_path, spec))


def test_cell_names_are_folder_safe():
    assert slug("openai/clip-vit-large-patch14") == "openai_clip-vit-large-patch14"
    assert slug("1e-4") == "1e-4" and slug("a b/c") == "a_b_c" and slug("///") == "_"
    assert slug("..") == "_" and slug(".hidden") == "_hidden"
    assert slug("../../x") == "__.._x"  # one folder name: no '/', no leading dot


def test_no_axis_or_matrix_name_writes_outside_the_sweep_folder(tmp_path):
    outside = tmp_path / "escaped"
    spec = {
        "name": "../../..",
        "axes": {
            "../../escaped": {"a": {"model.init_args.rank": 2}},
            str(outside / "absolute"): {"b": {"model.init_args.rank": 3}},
            "..": {"..": {"model.init_args.rank": 4}},
        },
    }
    matrix = Matrix.load(write_matrix(tmp_path, spec))
    assert "/" not in matrix.name and not matrix.name.startswith(".")
    out = tmp_path / "sweeps" / "s"
    for folder in plan(matrix, out):
        folder.write_plan()
        folder.write_status(state="pending")
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "matrix.yaml"]
    assert written and all(p.is_relative_to(out) for p in written)
    assert not outside.exists()


@pytest.mark.parametrize(
    "spec, refused",
    [
        (
            {"axes": {"a": {"x": {"trainer.default_root_dir": "/elsewhere"}}}},
            "trainer.default_root_dir is set by",
        ),
        ({"axes": {"a": {"key": "checkpoint.dirpath", "values": ["/x"]}}}, "checkpoint.dirpath is set by"),
        ({"axes": {"a": {"x": {}}}, "sample": {"out": "/x"}}, "sample: 'out' is set by the sweep"),
    ],
)
def test_a_matrix_cannot_choose_where_a_stage_writes(tmp_path, spec, refused):
    with pytest.raises(ValueError, match=refused):
        Matrix.load(write_matrix(tmp_path, spec))


@pytest.mark.parametrize(
    "command",
    [
        "phantoms --n 4 --out {sweep}/../escaped",
        "fit --config x.yaml --trainer.default_root_dir={sweep}/../escaped",
    ],
)
def test_a_prepare_command_writing_outside_the_sweep_is_refused(tmp_path, command):
    matrix = Matrix.load(write_matrix(tmp_path, {"axes": {"a": {"x": {}}}, "prepare": [command]}))
    with pytest.raises(SystemExit, match=r"writes to .*/s/\.\./escaped, outside the sweep's folder"):
        run_prepare(matrix, tmp_path / "s")
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "s" / ".prepare").exists()


# --- running ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_matrix(tmp_path_factory) -> Path:
    """Two tiny cells (U-Net and LoRA), each fit for 2 steps, sampled and evaluated."""
    folder = tmp_path_factory.mktemp("matrix")
    (folder / "short.yaml").write_text(
        "trainer:\n  max_steps: 2\n  limit_val_batches: 1\n  enable_progress_bar: false\n"
    )
    weights = random_inception_weights(folder / "inception.pth")
    spec = {
        "name": "tiny",
        "axes": {
            "strategy": {
                "unet": {"config": [str(TINY / "unet.yaml"), "short.yaml"]},
                "lora": {"config": [str(TINY / "lora.yaml"), "short.yaml"]},
            }
        },
        "sample": {"per-prompt": 1, "steps": 2, "split": "test", "seed": 3},
        "evaluate": {
            "real-split": "test",
            "extractors": ["inception"],
            "inception-weights": str(weights),
            "bootstrap": 5,
            "train-split": "",
        },
    }
    return write_matrix(folder, spec)


def statuses(out: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("*/status.json"))}


def test_dry_run_lists_cells_and_runs_nothing(tiny_matrix, tmp_path, capsys):
    medsd(["sweep", str(tiny_matrix), "--out", str(tmp_path / "sweep"), "--dry-run"])
    printed = capsys.readouterr().out
    assert (
        "2 cells" in printed and "pending  strategy-unet" in printed and "pending  strategy-lora" in printed
    )
    assert not (tmp_path / "sweep").exists()


def sweep_process(matrix: Path, out: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "experiments.cli", "sweep", str(matrix), "--out", str(out)]
    return subprocess.Popen(command, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL)


def test_a_killed_sweep_resumes_without_redoing_finished_cells(tiny_matrix, tmp_path):
    out = tmp_path / "sweep"
    process = sweep_process(tiny_matrix, out)
    deadline = time.monotonic() + 300
    # Kill the whole process group once the second cell is under way.
    while statuses(out).get("strategy-lora", {}).get("state") != "running":
        assert process.poll() is None and time.monotonic() < deadline, "the sweep ended or stalled"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    before = statuses(out)
    assert before["strategy-unet"]["state"] == "done" and before["strategy-lora"]["state"] == "running"
    finished = out / "strategy-unet" / "metrics" / "metrics.json"
    finished_bytes, finished_mtime = finished.read_bytes(), finished.stat().st_mtime_ns

    medsd(["sweep", str(tiny_matrix), "--out", str(out)])
    after = statuses(out)
    assert {name: s["state"] for name, s in after.items()} == {
        "strategy-lora": "done",
        "strategy-unet": "done",
    }
    assert after["strategy-unet"]["updated"] == before["strategy-unet"]["updated"]  # not touched
    assert finished.read_bytes() == finished_bytes and finished.stat().st_mtime_ns == finished_mtime
    assert after["strategy-lora"]["attempts"] == 2

    summary = (out / "summary.csv").read_text()
    assert "strategy-lora" in summary and "strategy-unet" in summary and "fid" in summary
    report = (out / "report.md").read_text()
    assert "2 done" in report and "plots/fid_inception-v3.png" in report
    assert (out / "plots" / "fid_inception-v3.png").is_file()
    config = yaml.safe_load((out / "strategy-lora" / "run" / "config.yaml").read_text())
    assert config["model"]["class_path"] == "lightning_modules.LoRAFineTuning"


def test_failed_cells_are_kept_until_retried(tiny_matrix, tmp_path):
    spec = yaml.safe_load(tiny_matrix.read_text())
    spec["axes"]["strategy"] = {
        "broken": {"config": str(TINY / "unet.yaml"), "model.init_args.optimizer.lr": "x"}
    }
    matrix = tiny_matrix.parent / "broken.yaml"
    matrix.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp_path / "sweep"
    medsd(["sweep", str(matrix), "--out", str(out)])
    first = statuses(out)["strategy-broken"]
    assert first["state"] == "failed" and first["error"].startswith("fit: exit code")
    medsd(["sweep", str(matrix), "--out", str(out)])
    assert statuses(out)["strategy-broken"]["attempts"] == 1  # not retried
    medsd(["sweep", str(matrix), "--out", str(out), "--retry-failed"])
    assert statuses(out)["strategy-broken"]["attempts"] == 2
    assert "failed" in (out / "report.md").read_text()


def test_parallel_workers_each_see_only_their_gpu_group(tiny_matrix, tmp_path, monkeypatch):
    seen = {}

    def fake_run_cell(matrix, folder, retry_failed, env=None):
        seen[folder.cell.name] = env["CUDA_VISIBLE_DEVICES"]
        time.sleep(0.2)  # both workers get a cell
        return "done"

    monkeypatch.setattr(sweep_launchers, "run_cell", fake_run_cell)
    matrix = Matrix.load(tiny_matrix)
    sweep_launchers.run_parallel(matrix, plan(matrix, tmp_path), False, ["0,1", "2,3"])
    assert sorted(seen) == ["strategy-lora", "strategy-unet"]
    assert sorted(seen.values()) == ["0,1", "2,3"]


def test_submitit_runs_a_two_cell_sweep_through_its_local_executor(tiny_matrix, tmp_path):
    out = tmp_path / "sweep"
    medsd(["sweep", str(tiny_matrix), "--out", str(out), "--launcher", "submitit", "--cluster", "local",
           "--timeout-min", "20"])  # fmt: skip
    assert {name: s["state"] for name, s in statuses(out).items()} == {
        "strategy-lora": "done",
        "strategy-unet": "done",
    }
    assert list((out / "submitit").glob("*_log.out"))  # the jobs' own logs
    assert "2 done" in (out / "report.md").read_text()


def test_prepare_commands_run_once_and_cells_name_their_output(tmp_path):
    spec = {
        "prepare": ["phantoms --layout mimic-cxr --n 12 --out {sweep}/data --image-size 32"],
        "axes": {"strategy": {"unet": {"config": str(TINY / "phantoms" / "mimic_cxr.yaml"),
                                       "data.init_args.root": "{sweep}/data"}}},
    }  # fmt: skip
    matrix = Matrix.load(write_matrix(tmp_path, spec))
    out = tmp_path / "sweep"
    run_prepare(matrix, out)
    assert (out / "data" / "mimic-cxr-2.0.0-metadata.csv.gz").is_file()
    run_prepare(matrix, out)  # done already: not run again
    assert (out / "logs" / "prepare.log").read_text().count("$ medsd phantoms") == 1
    (folder,) = plan(matrix, out)
    fit = in_sweep(stage_args(matrix, folder, "fit"), out)
    assert fit[fit.index("--data.init_args.root") + 1] == f"{out}/data"
