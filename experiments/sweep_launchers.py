"""Where a sweep's cells run: one after another, in parallel over GPU groups, or as cluster jobs.

- `local` (default): cells one after another in this process's machine; each cell's Trainer does
  its own DDP over the GPUs it sees (`--trainer.devices`).
- `parallel --gpu-groups 0,1 2,3`: one worker per group of GPUs, each taking the next pending cell
  and running it with CUDA_VISIBLE_DEVICES set to its group.
- `submitit`: one job per cell through submitit (`--cluster slurm`, or `local` to run the jobs as
  local processes, as the tests do), submitted as an array. With several tasks per job (one per
  GPU, over `--nodes` nodes), every task runs the fit, where Lightning's SLURM environment joins
  them into one DDP run; task 0 alone writes the status and samples and evaluates afterwards.

Every launcher runs cells through `sweep.run_cell`, so statuses, resume and retries behave the same.
"""

from __future__ import annotations

import argparse
import queue
import threading
from pathlib import Path

from .matrix import Matrix
from .sweep import CellFolder, in_sweep, run_cell, run_stage, settled, stage_args


def add_launcher_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("launcher")
    group.add_argument("--launcher", choices=["local", "parallel", "submitit"], default="local")
    group.add_argument("--gpu-groups", nargs="+", help="parallel: GPU id lists, e.g. 0,1 2,3")
    group.add_argument("--cluster", choices=["slurm", "local"], default="slurm", help="submitit executor")
    group.add_argument("--partition", help="submitit on SLURM: partition")
    group.add_argument("--timeout-min", type=int, default=24 * 60, help="submitit: time limit per cell")
    group.add_argument("--nodes", type=int, default=1, help="submitit: nodes per cell")
    group.add_argument("--gpus-per-node", type=int, default=0, help="submitit: GPUs (and tasks) per node")
    group.add_argument("--array-parallelism", type=int, default=64, help="submitit: cells running at once")


def launch(args: argparse.Namespace, matrix: Matrix, folders: list[CellFolder], out: Path) -> None:
    if args.launcher == "parallel":
        if not args.gpu_groups:
            raise SystemExit("medsd sweep: --launcher parallel needs --gpu-groups (e.g. 0,1 2,3)")
        run_parallel(matrix, folders, args.retry_failed, args.gpu_groups)
    elif args.launcher == "submitit":
        run_submitit(matrix, folders, args.retry_failed, out, args)
    else:
        run_sequential(matrix, folders, args.retry_failed)


def run_sequential(matrix: Matrix, folders: list[CellFolder], retry_failed: bool) -> None:
    """Cells one after another, with a progress display: a bar over the cells, the current cell
    and stage, and the time so far. Each finished cell is printed with its state."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn()]  # fmt: skip
    with Progress(*columns) as progress:
        task = progress.add_task("sweep", total=len(folders))
        for folder in folders:

            def show(stage: str, name: str = folder.cell.name) -> None:
                progress.update(task, description=f"{name}: {stage}")

            state = run_cell(matrix, folder, retry_failed, on_stage=show)
            progress.console.print(f"{folder.cell.name}: {state}")
            progress.advance(task)


def run_parallel(matrix: Matrix, folders: list[CellFolder], retry_failed: bool, groups: list[str]) -> None:
    """One worker thread per GPU group; each runs the next cell with only its GPUs visible."""
    pending: queue.Queue[CellFolder] = queue.Queue()
    for folder in folders:
        pending.put(folder)

    def worker(group: str) -> None:
        while True:
            try:
                folder = pending.get_nowait()
            except queue.Empty:
                return
            state = run_cell(matrix, folder, retry_failed, env={"CUDA_VISIBLE_DEVICES": group})
            print(f"{folder.cell.name} (GPUs {group}): {state}", flush=True)

    threads = [threading.Thread(target=worker, args=(group,)) for group in groups]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def run_submitit(matrix: Matrix, folders: list[CellFolder], retry_failed: bool, out: Path, args) -> None:
    """One job per cell, submitted as an array; waits for all of them."""
    import submitit

    executor = submitit.AutoExecutor(folder=out / "submitit", cluster=args.cluster)
    tasks = max(args.gpus_per_node, 1)
    executor.update_parameters(
        timeout_min=args.timeout_min,
        nodes=args.nodes,
        tasks_per_node=tasks,
        gpus_per_node=args.gpus_per_node,
        slurm_array_parallelism=args.array_parallelism,
        **({"slurm_partition": args.partition} if args.partition else {}),
    )
    todo = [f for f in folders if f.status()["state"] not in ("done", *([] if retry_failed else ["failed"]))]
    n = len(todo)
    jobs = executor.map_array(
        cell_job, [str(matrix.path)] * n, [str(out)] * n, [f.cell.name for f in todo], [retry_failed] * n
    )
    for folder, job in zip(todo, jobs, strict=True):
        print(f"{folder.cell.name}: job {job.job_id}", flush=True)
    for folder, job in zip(todo, jobs, strict=True):
        try:
            state = job.results()[0]
        except Exception as error:  # a job killed by the cluster: its status file says where it was
            state = f"job failed ({type(error).__name__})"
        print(f"{folder.cell.name}: {state}", flush=True)


def cell_job(matrix_path: str, out: str, cell_name: str, retry_failed: bool) -> str:
    """What a submitit job runs: the cell on task 0; the fit only on the other tasks (see above)."""
    import submitit

    matrix = Matrix.load(matrix_path)
    cell = next(c for c in matrix.cells() if c.name == cell_name)
    folder = CellFolder(Path(out), cell)
    rank = submitit.JobEnvironment().global_rank
    if rank == 0:
        return run_cell(matrix, folder, retry_failed)
    status = folder.status()
    if settled(status, retry_failed):
        return status["state"]
    if "fit" in folder.remaining_stages():
        log = folder.path / "logs" / f"fit.rank{rank}.log"
        run_stage(in_sweep(stage_args(matrix, folder, "fit"), Path(out)), log)
    return "fit task done"
