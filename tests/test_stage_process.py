"""A sweep's stages forked from the warm stage server behave as new processes would: exit codes,
messages and logs, the environment given, and one server serving a thread's stages in turn.
(That a stage dies with a SIGKILLed sweep is tested in test_run_lock.py.)"""

from __future__ import annotations

import threading

import pytest

from experiments import stage_process

pytestmark = pytest.mark.slow


@pytest.fixture(params=["server", "new processes"])
def mode(request, monkeypatch):
    monkeypatch.setenv(stage_process.SERVER_ENV, "1" if request.param == "server" else "0")
    if request.param == "server" and not stage_process.use_server():
        pytest.skip("a GPU is visible: stages start as new processes")
    return request.param


def test_a_stage_runs_and_its_output_and_exit_code_come_back(mode, tmp_path):
    log = tmp_path / "logs" / "phantoms.log"
    log.parent.mkdir()
    out = tmp_path / "phantoms"
    args = ["phantoms", "--layout", "mimic-cxr", "--n", "6", "--image-size", "16", "--out", str(out)]
    assert stage_process.run_medsd(args, log) == 0
    assert (out / "mimic-cxr-2.0.0-chexpert.csv.gz").is_file()
    assert len(list(out.rglob("*.jpg"))) >= 6
    assert f"$ medsd {' '.join(args)}" in log.read_text()


def test_an_error_message_and_its_exit_code_are_those_of_a_new_process(mode, tmp_path):
    log = tmp_path / "stage.log"
    missing = tmp_path / "missing.yaml"
    assert stage_process.run_medsd(["sweep", str(missing)], log) == 1
    text = log.read_text()
    assert f"medsd sweep: error: {missing}: No such file or directory" in text
    assert "Traceback" not in text
    # The environment given reaches the stage: with MEDSD_TRACEBACK the error is raised as it is.
    assert stage_process.run_medsd(["sweep", str(missing)], log, {"MEDSD_TRACEBACK": "1"}) == 1
    assert "Traceback" in log.read_text() and "FileNotFoundError" in log.read_text()


def test_a_threads_stages_share_one_server_and_other_threads_get_their_own(monkeypatch, tmp_path):
    monkeypatch.setenv(stage_process.SERVER_ENV, "1")
    if not stage_process.use_server():
        pytest.skip("a GPU is visible: stages start as new processes")
    servers = []

    def two_stages(name: str) -> None:
        for _ in range(2):
            assert stage_process.run_medsd(["sweep", "--help"], tmp_path / f"{name}.log") == 0
            servers.append((name, stage_process._servers.process.pid))

    for name in ("first", "second"):
        thread = threading.Thread(target=two_stages, args=(name,))
        thread.start()
        thread.join()
    pids = {name: {pid for n, pid in servers if n == name} for name in ("first", "second")}
    assert all(len(p) == 1 for p in pids.values()), pids
    assert pids["first"] != pids["second"]
    assert (tmp_path / "first.log").read_text().count("usage: medsd sweep") == 2
