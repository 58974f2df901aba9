"""`medsd sweep MATRIX.yaml`: every cell of a matrix through fit, sample and evaluate, resumably.

    medsd sweep experiments/matrices/demo.yaml [--out DIR] [--dry-run] [--retry-failed]

Each cell (see `experiments.matrix`) gets a folder under `--out` (default `runs/sweeps/<name>`):

    <cell>/cell.json      its labels and `medsd fit` arguments
    <cell>/status.json    state (pending / running / interrupted / done / failed), the last
                          finished stage, attempts, the error of a failure and the stages a killed
                          sweep left unfinished (`interrupted`); always written atomically
    <cell>/run/           the fit's run folder: resolved config.yaml, checkpoints, export,
                          metrics.json with the cost
    <cell>/samples/       `medsd sample` output (the matrix's `sample` flags; the test prompts for
                          FID and insertion); <cell>/samples-augmentation/ the same with the
                          `augmentation_sample` flags (the training prompts the augmentation
                          protocol needs), when the matrix has them; <cell>/metrics/ `medsd evaluate`
    <cell>/logs/<stage>.log

Stages run as processes of their own (`medsd STAGE ...`, forked from a process that has imported
the libraries once where no GPU is visible: experiments.stage_process), so a crashing cell cannot take
the sweep down and each cell's Trainer does its own DDP over the GPUs it sees. A rerun skips done
cells, continues an interrupted cell from its first unfinished stage (the fit from its last
checkpoint, sampling from the images it has), and leaves failed cells alone unless
`--retry-failed`. A done cell is never touched again, so its metrics stay as they were. At the end
(and with `--summary-only`) the summary table and plots are written (`experiments.sweep_report`).

A cell has one owner: the sweep process running it locks its folder (`experiments.run_lock`),
and each stage locks its own output folder (run/, samples/, metrics/), so a second sweep on the
same folder skips the cell, naming its owner, and a `medsd fit` into a running fit's folder is
refused. Stages die with the sweep, even a SIGKILLed one (`experiments.parent_death`); a rerun
takes over the dead sweep's lock, marks a cell it left "running" as interrupted and continues it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from datamodules.atomic import write_atomically

from .cli import command_parser
from .matrix import Cell, Matrix
from .run_lock import FolderInUse, RunLock
from .stage_process import run_medsd

log = logging.getLogger(__name__)

STAGES = ("fit", "sample", "sample-augmentation", "evaluate")
STATES = ("pending", "running", "interrupted", "done", "failed")


class CellFolder:
    """A cell's folder and its status file."""

    def __init__(self, root: Path, cell: Cell):
        self.cell, self.path = cell, root / cell.name
        if not self.path.resolve().is_relative_to(Path(root).resolve()):
            raise ValueError(f"cell {cell.name!r} would have its folder outside the sweep folder {root}")
        self.run, self.samples, self.metrics = self.path / "run", self.path / "samples", self.path / "metrics"
        self.augmentation_samples = self.path / "samples-augmentation"

    def status(self) -> dict:
        path = self.path / "status.json"
        return json.loads(path.read_text()) if path.is_file() else {"state": "pending", "stage": None}

    def write_status(self, **fields) -> dict:
        status = {**self.status(), **fields, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.path.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path / "status.json", lambda tmp: tmp.write_text(json.dumps(status, indent=2)))
        return status

    def write_plan(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.cell.as_dict(), indent=2)
        write_atomically(self.path / "cell.json", lambda tmp: tmp.write_text(text))

    def remaining_stages(self) -> list[str]:
        finished = self.status().get("stage")
        return list(STAGES[STAGES.index(finished) + 1 :]) if finished in STAGES else list(STAGES)


def flags(options: dict) -> list[str]:
    """{"per-prompt": 2, "extractors": ["clip", "xrv"], "dry": True} -> command-line flags."""
    args: list[str] = []
    for key, value in options.items():
        if value is False or value is None:
            continue
        args.append(f"--{key}")
        if value is not True:
            args += [str(v) for v in value] if isinstance(value, list) else [str(value)]
    return args


def stage_args(matrix: Matrix, folder: CellFolder, stage: str) -> list[str]:
    """The `medsd STAGE ...` arguments of one stage of a cell."""
    config = ["--config", str(folder.run / "config.yaml")]  # the fit's resolved config
    if stage == "fit":
        args = ["fit", *folder.cell.fit_args, "--trainer.default_root_dir", str(folder.run)]
        # `last` resolves to the newest complete checkpoint (lightning_modules/run_checkpoints.py).
        return args + (["--ckpt_path", "last"] if any((folder.run / "checkpoints").glob("*.ckpt")) else [])
    if stage in ("sample", "sample-augmentation"):
        options = dict(matrix.sample if stage == "sample" else matrix.augmentation_sample)
        out = folder.samples if stage == "sample" else folder.augmentation_samples
        if "prompts" in options:  # a prompt file, relative to the matrix
            options["prompts"] = str((matrix.path.parent / options["prompts"]).resolve())
        else:  # prompts from a split of the cell's own dataset
            options["config"] = config[1]
        return ["sample", str(folder.run), "--out", str(out), *flags(options)]
    augmentation = (
        ["--augmentation-generated", str(folder.augmentation_samples)] if matrix.augmentation_sample else []
    )
    return [
        "evaluate",
        "--generated",
        str(folder.samples),
        "--out",
        str(folder.metrics),
        *config,
        *augmentation,
        *flags(matrix.evaluate),
    ]


def in_sweep(args: list[str], out: Path) -> list[str]:
    """`{sweep}` in any argument -> the sweep's folder."""
    return [arg.replace("{sweep}", str(out)) for arg in args]


# The flags by which a prepare command (medsd phantoms, prepare, fit, ...) says where it writes.
WRITE_FLAGS = ("--out", "--trainer.default_root_dir")


def check_writes_in_sweep(args: list[str], out: Path) -> None:
    """A prepare command must write in the sweep's folder: a matrix writes nowhere else."""
    values = [b for a, b in zip(args, args[1:], strict=False) if a in WRITE_FLAGS]
    values += [a.split("=", 1)[1] for a in args if a.startswith(tuple(f"{f}=" for f in WRITE_FLAGS))]
    for value in values:
        if not Path(value).resolve().is_relative_to(out.resolve()):
            raise SystemExit(
                f"medsd sweep: the prepare command `medsd {' '.join(args)}` writes to {value}, outside the "
                f"sweep's folder {out}: name it {{sweep}}/..."
            )


def run_prepare(matrix: Matrix, out: Path) -> None:
    """The matrix's `prepare` commands, each once: a finished one leaves a marker holding its
    command line, and is run again only if that line changes."""
    log_path = out / "logs" / "prepare.log"
    for number, args in enumerate(matrix.prepare):
        args = in_sweep(args, out)
        check_writes_in_sweep(args, out)
        line = " ".join(args)
        marker = out / ".prepare" / f"{number}.done"
        if marker.is_file() and marker.read_text() == line:
            continue
        print(f"prepare: medsd {line}", flush=True)
        error = run_stage(args, log_path)
        if error:
            raise SystemExit(f"medsd sweep: prepare command failed ({error}); see {log_path}")
        marker.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(marker, lambda tmp, text=line: tmp.write_text(text))


def run_cell(
    matrix: Matrix,
    folder: CellFolder,
    retry_failed: bool = False,
    env: dict | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> str:
    """Run a cell's unfinished stages (with `env` added to the environment) while holding its
    folder; returns its final state, or "running" when another process holds it. `on_stage(stage)`
    is called as each stage starts (for a progress display)."""
    status = folder.status()
    if settled(status, retry_failed):
        return status["state"]
    try:
        with RunLock(folder.path):
            return run_stages(matrix, folder, retry_failed, env, on_stage)
    except FolderInUse as error:
        log.warning("cell %s skipped: %s", folder.cell.name, error)
        return "running"


def settled(status: dict, retry_failed: bool) -> bool:
    """Whether a cell with this status is left as it is."""
    return status["state"] == "done" or (status["state"] == "failed" and not retry_failed)


def run_stages(
    matrix: Matrix,
    folder: CellFolder,
    retry_failed: bool,
    env: dict | None,
    on_stage: Callable[[str], None] | None,
) -> str:
    """`run_cell`'s work, under the cell's lock."""
    status = folder.status()  # again, under the lock: a sweep that held it may just have finished it
    if settled(status, retry_failed):
        return status["state"]
    if status["state"] == "running":  # yet nobody holds it: its sweep was killed
        log.warning("cell %s was interrupted in %s; continuing it", folder.cell.name, status.get("running"))
        interrupted = [*status.get("interrupted", []), status.get("running")]
        status = folder.write_status(state="interrupted", running=None, interrupted=interrupted)
    folder.write_plan()
    attempts = status.get("attempts", 0) + 1
    for stage in folder.remaining_stages():
        if stage == "sample-augmentation" and not matrix.augmentation_sample:
            folder.write_status(stage=stage)
            continue
        folder.write_status(state="running", running=stage, attempts=attempts, error=None)
        if on_stage is not None:
            on_stage(stage)
        args = in_sweep(stage_args(matrix, folder, stage), folder.path.parent)
        error = run_stage(args, folder.path / "logs" / f"{stage}.log", env)
        if error:
            folder.write_status(state="failed", running=None, error=f"{stage}: {error}")
            log.error("cell %s failed in %s: %s", folder.cell.name, stage, error)
            return "failed"
        folder.write_status(stage=stage, running=None)
    folder.write_status(state="done")
    return "done"


def run_stage(args: list[str], log_path: Path, env: dict | None = None) -> str | None:
    """Run `medsd ARGS` in a process of its own that dies with this one (experiments.stage_process),
    appending to `log_path`; None on success, else the error."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    returncode = run_medsd(args, log_path, env)
    if returncode == 0:
        return None
    tail = log_path.read_text().strip().splitlines()[-3:]
    return f"exit code {returncode}: {' | '.join(tail)}"


def plan(matrix: Matrix, out: Path) -> list[CellFolder]:
    return [CellFolder(out, cell) for cell in matrix.cells()]


def describe(folders: list[CellFolder]) -> str:
    """One line per cell: state, name, fit arguments."""
    lines = []
    for folder in folders:
        status = folder.status()
        lines.append(
            f"{status['state']:8s} {folder.cell.name}\n         medsd fit {' '.join(folder.cell.fit_args)}"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    from .sweep_launchers import add_launcher_arguments, launch  # they run this module's cells

    parser = command_parser(prog="medsd sweep", description=__doc__.split("\n")[0])
    parser.add_argument("matrix", help="matrix YAML file")
    parser.add_argument("--out", help="sweep folder (default: runs/sweeps/<matrix name>)")
    parser.add_argument("--dry-run", action="store_true", help="list the cells and their state, run nothing")
    parser.add_argument("--retry-failed", action="store_true", help="run failed cells again")
    parser.add_argument("--summary-only", action="store_true", help="only (re)write the summary and plots")
    add_launcher_arguments(parser)
    args = parser.parse_args(argv)
    matrix = Matrix.load(args.matrix)
    out = Path(args.out or Path("runs") / "sweeps" / matrix.name)
    folders = plan(matrix, out)
    if args.dry_run:
        print(f"{len(folders)} cells in {out}:\n{describe(folders)}")
        return
    if not args.summary_only:
        run_prepare(matrix, out)
        launch(args, matrix, folders, out)

    from .sweep_report import write_report  # imported here: pandas and the metric registry

    report = write_report(matrix, folders, out)
    print(f"report: {report}")
