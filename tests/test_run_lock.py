"""One owner per folder (experiments/run_lock.py): a second process is refused with its owner
named, a dead owner's lock is taken over, and a SIGKILLed sweep takes its stages with it."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
import yaml

from experiments import sweep
from experiments.cli import main as medsd
from experiments.matrix import Matrix
from experiments.run_lock import LOCK_NAME, RANK_VARIABLES, FolderInUse, RunLock, _process_start, for_rank
from tests.helpers.fit import tiny_fit

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
HOLD = (
    "import sys, time; from experiments.run_lock import RunLock; "
    "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(300)"
)


@contextmanager
def held_elsewhere(folder: Path):
    """`folder` locked by another process (a Popen) for the block."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline() == "held\n"
        yield process
    finally:
        process.kill()
        process.wait()


@pytest.fixture
def rank_zero(monkeypatch):
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def write_lock(folder: Path, **owner) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    path.write_text(
        json.dumps({"host": socket.gethostname(), "command": "medsd fit", "started": "then", **owner})
    )
    return path


def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def test_a_second_process_is_refused_with_the_owner_named(tmp_path):
    with held_elsewhere(tmp_path) as owner:
        with pytest.raises(FolderInUse) as refused:
            RunLock(tmp_path).acquire()
    message = str(refused.value)
    assert f"in use by PID {owner.pid} on {socket.gethostname()} since 20" in message
    assert f"(-c {tmp_path})" in message and "wait for it to end" in message  # its command: python -c


def test_a_dead_owners_lock_is_taken_over_with_a_log_line_and_released_after(tmp_path, caplog):
    with held_elsewhere(tmp_path) as owner:
        pass  # killed on leaving: its lock stays behind
    lock = tmp_path / LOCK_NAME
    assert json.loads(lock.read_text())["pid"] == owner.pid
    with caplog.at_level(logging.WARNING, "experiments.run_lock"), RunLock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert f"taking over the lock of PID {owner.pid}" in caplog.text
    assert f"process {owner.pid} has ended" in caplog.text
    assert not lock.exists()


def test_a_killed_owner_not_yet_reaped_is_dead(tmp_path):
    with held_elsewhere(tmp_path) as owner:
        owner.send_signal(signal.SIGKILL)  # a zombie until this process, its parent, waits for it
        while Path(f"/proc/{owner.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
            time.sleep(0.01)
        with RunLock(tmp_path):
            pass


def test_a_reused_pid_is_not_taken_for_its_first_owner(tmp_path, caplog):
    parent = os.getppid()  # alive: the process that started pytest
    owner = {"pid": parent, "boot": boot_id()}
    write_lock(tmp_path, **owner, process_start=_process_start(parent))
    with pytest.raises(FolderInUse, match=f"PID {parent} on"):
        RunLock(tmp_path).acquire()
    write_lock(tmp_path, **owner, process_start=_process_start(parent) - 1)  # started at another time
    with caplog.at_level(logging.WARNING, "experiments.run_lock"), RunLock(tmp_path):
        pass
    assert f"PID {parent} now belongs to another process" in caplog.text


def test_a_lock_from_another_host_is_refused_saying_how_to_remove_it(tmp_path):
    lock = write_lock(tmp_path, pid=12345, host="elsewhere")
    before = lock.read_bytes()
    with pytest.raises(FolderInUse, match=f"PID 12345 on elsewhere .*another host.*remove {lock}"):
        RunLock(tmp_path).acquire()
    assert lock.read_bytes() == before


def test_its_owner_may_enter_again_and_the_first_entry_releases(tmp_path):
    first = RunLock(tmp_path).acquire()
    with RunLock(tmp_path):
        pass
    assert (tmp_path / LOCK_NAME).exists()
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_only_rank_zero_takes_the_lock(tmp_path, rank_zero, monkeypatch):
    with held_elsewhere(tmp_path):
        with for_rank(tmp_path, rank=1):
            pass
        monkeypatch.setenv("LOCAL_RANK", "1")  # a rank Lightning's launcher started
        with for_rank(tmp_path):
            pass
        monkeypatch.setenv("LOCAL_RANK", "0")
        with pytest.raises(FolderInUse):
            with for_rank(tmp_path):
                pass


def test_a_fit_into_a_locked_folder_is_refused_and_writes_nothing(tmp_path, rank_zero, caplog):
    run = tmp_path / "run"
    with held_elsewhere(run) as owner:
        lock = (run / LOCK_NAME).read_bytes()
        with pytest.raises(SystemExit, match=f"{run} is in use by PID {owner.pid} "):
            tiny_fit(run)
        assert [p.name for p in run.iterdir()] == [LOCK_NAME] and (run / LOCK_NAME).read_bytes() == lock
    # Its owner killed, the fit takes the folder over, and frees it as it returns (in-process too).
    with caplog.at_level(logging.WARNING, "experiments.run_lock"):
        tiny_fit(run, "--trainer.max_steps", "1")
    assert f"taking over the lock of PID {owner.pid}" in caplog.text
    assert (run / "config.yaml").is_file() and not (run / LOCK_NAME).exists()


# --- a SIGKILLed sweep --------------------------------------------------------------------------


def session_processes(session: int) -> list[int]:
    """The live (not zombie) processes of a session."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with suppress(OSError):
            state, _, _, sid = stat.read_text().rpartition(")")[2].split()[:4]
            if state != "Z" and int(sid) == session:
                found.append(int(stat.parent.name))
    return found


def wait_for_owner(lock: Path, process: subprocess.Popen, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while True:
        with suppress(OSError, ValueError):
            return json.loads(lock.read_text())["pid"]
        assert process.poll() is None and time.monotonic() < deadline, "the sweep ended or stalled"
        time.sleep(0.2)


@pytest.fixture
def long_fit_matrix(tmp_path) -> Path:
    """One cell whose fit runs far longer than the test."""
    (tmp_path / "long.yaml").write_text("trainer:\n  max_steps: 100000\n  enable_progress_bar: false\n")
    config = [str(ROOT / "experiments" / "configs" / "tiny" / "unet.yaml"), "long.yaml"]
    path = tmp_path / "matrix.yaml"
    path.write_text(yaml.safe_dump({"name": "long", "axes": {"strategy": {"unet": {"config": config}}}}))
    return path


def test_a_killed_sweep_takes_its_stage_with_it_and_its_rerun_marks_the_cell_interrupted(
    long_fit_matrix, tmp_path, rank_zero, monkeypatch, caplog
):
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "experiments.cli", "sweep", str(long_fit_matrix), "--out", str(out)]
    # A session of its own: whatever is left of it afterwards is found, and killed at the end.
    process = subprocess.Popen(command, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL)
    try:
        cell = out / "strategy-unet"
        fit = wait_for_owner(cell / "run" / LOCK_NAME, process)
        assert wait_for_owner(cell / LOCK_NAME, process) == process.pid
        with pytest.raises(SystemExit, match=f"is in use by PID {fit} "):
            tiny_fit(cell / "run")  # a second fit into the running fit's folder

        process.send_signal(signal.SIGKILL)  # the sweep alone, not its session
        process.wait()
        deadline = time.monotonic() + 5
        while session_processes(process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert session_processes(process.pid) == [], "a stage outlived the sweep by 5 s"
    finally:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert json.loads((cell / "status.json").read_text())["state"] == "running"

    ran = []
    monkeypatch.setattr(sweep, "run_stage", lambda args, log, env=None: ran.append(args[0]))
    matrix = Matrix.load(long_fit_matrix)
    (folder,) = sweep.plan(matrix, out)
    with caplog.at_level(logging.WARNING):
        assert sweep.run_cell(matrix, folder) == "done"
    assert ran == ["fit", "sample", "evaluate"]  # from its first unfinished stage, the fit
    status = json.loads((cell / "status.json").read_text())
    assert status["interrupted"] == ["fit"] and status["attempts"] == 2
    assert f"taking over the lock of PID {process.pid}" in caplog.text
    assert "cell strategy-unet was interrupted in fit" in caplog.text
    assert not (cell / LOCK_NAME).exists()


@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_sample_and_evaluate_into_a_locked_folder_are_refused(command, tmp_path, rank_zero):
    out = tmp_path / "out"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a bright circle\n")
    args = {
        "sample": ["sample", "medsd/tiny-sd", "--out", str(out), "--prompts", str(prompts)],
        "evaluate": [
            "evaluate",
            "--generated",
            str(tmp_path),
            "--out",
            str(out),
            "--real-folder",
            str(tmp_path),
        ],
    }[command]
    with held_elsewhere(out) as owner:
        with pytest.raises(SystemExit, match=f"{out} is in use by PID {owner.pid} "):
            medsd(args)
        assert [p.name for p in out.iterdir()] == [LOCK_NAME]
