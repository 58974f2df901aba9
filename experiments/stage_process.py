"""A sweep's stage processes: `medsd STAGE ...` in a process of its own, forked from a warm
stage server where that is safe.

A stage runs in its own process so that a crash cannot take the sweep down and each stage has
its own memory and global state. Starting `python -m experiments.cli` costs 8-10 s of imports
on a 2-core machine (torch; Lightning, which imports torchmetrics and with it torchvision and
transformers; diffusers) before any work: as long as a demo cell's training, and a demo sweep
starts 22 stages. So on a machine without a GPU the sweep starts one stage server
(`python -m experiments.stage_process`), which does the imports once (`SERVER_IMPORTS`) and
then forks one child per stage: the child starts with the modules loaded, its output going to
the stage's log, and runs `experiments.cli.console()` with the stage's arguments as a new
process would; the server answers with its exit code.

Where a GPU is visible stages start as new processes: an import that touched the CUDA driver in
the server would leave it unusable in every forked child, and beside GPU training the imports
are a small part of a stage. `MEDSD_STAGE_SERVER=0` turns the server off too. Either way a stage
dies with the sweep (experiments/parent_death.py): the server dies with the sweep thread that
started it, and each forked stage with the server.
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import threading
import traceback
from pathlib import Path

from .parent_death import PARENT_ENV, child_environment, die_with_parent

SERVER_ENV = "MEDSD_STAGE_SERVER"
# What every stage imports; the server loads them once (a failed import is left to the stage).
SERVER_IMPORTS = ("torch", "lightning", "diffusers", "transformers", "experiments.lightning_cli")

# One server per sweep thread: the parallel launcher runs stages from several threads at once,
# and a server forks one stage at a time.
_servers = threading.local()


def use_server() -> bool:
    """Whether stages are forked from a stage server (see the module docstring)."""
    if os.environ.get(SERVER_ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    import torch  # the sweep never forks a stage itself, so asking the CUDA driver here is harmless

    return not torch.cuda.is_available()


def run_medsd(args: list[str], log_path: Path, env: dict | None = None) -> int:
    """Run `medsd ARGS` with `env` added to its environment and its output appended to
    `log_path`; its exit code (negative: the signal that ended it)."""
    with open(log_path, "a") as out:
        out.write(f"\n$ medsd {' '.join(args)}\n")
        if not use_server():
            out.flush()
            environment = {**os.environ, **(env or {}), **child_environment()}
            command = [sys.executable, "-m", "experiments.cli", *args]
            return subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=environment).returncode
    server = getattr(_servers, "process", None)
    if server is None or server.poll() is not None:
        server = start_server(log_path)
        _servers.process = server
    server.stdin.write(json.dumps({"args": args, "log_path": str(log_path), "env": env or {}}) + "\n")
    server.stdin.flush()
    answer = server.stdout.readline()
    if not answer:  # the server itself died (killed, out of memory): the next stage starts a new one
        with open(log_path, "a") as out:
            out.write(f"medsd: the stage server ended (exit code {server.wait()}) while running this stage\n")
        return 1
    return int(answer)


def start_server(log_path: Path) -> subprocess.Popen:
    """A stage server for this thread; what its imports print goes to the first stage's log."""
    command = [sys.executable, "-m", "experiments.stage_process"]
    environment = {**os.environ, **child_environment()}
    with open(log_path, "a") as log:
        return subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=environment, text=True
        )


def serve() -> None:
    """The stage server: the imports, then one forked stage per request line on stdin, each
    answered on stdout with its exit code. Ends at the end of its input or with its parent."""
    die_with_parent()
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # what an import prints must not be taken for an answer
    for module in SERVER_IMPORTS:
        try:
            importlib.import_module(module)
        except ImportError:
            pass  # the stage that needs it says so in its own log
    for line in sys.stdin:
        request = json.loads(line)
        child = os.fork()
        if child == 0:
            replies.close()
            forked_stage(**request)
        _, status = os.waitpid(child, 0)
        print(os.waitstatus_to_exitcode(status), file=replies, flush=True)


def forked_stage(args: list[str], log_path: str, env: dict) -> None:
    """A forked stage: its output to its log, its environment, `medsd ARGS`, then the exit a
    process would make (atexit functions run; os._exit, so nothing of the server's runs)."""
    code = 1
    try:
        nothing = os.open(os.devnull, os.O_RDONLY)
        os.dup2(nothing, 0)  # the server's stdin carries its requests
        os.close(nothing)
        log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        # The server is this process's parent: `medsd` dies with it (and it with the sweep).
        os.environ.update({**env, PARENT_ENV: str(os.getppid())})
        sys.argv = ["medsd", *args]
        # Lightning starts the other ranks of a multi-process run as copies of this command, read
        # from __main__'s module name: make it `python -m experiments.cli ARGS`, a new process's.
        sys.modules["__main__"].__spec__ = importlib.util.find_spec("experiments.cli")
        from experiments.cli import console

        try:
            console()
            code = 0
        except SystemExit as exit_:
            code = exit_code(exit_)
        except BaseException:
            traceback.print_exc()
        finally:
            atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def exit_code(exit_: SystemExit) -> int:
    """The exit code the interpreter gives a SystemExit (a message is printed, and means 1)."""
    if exit_.code is None or isinstance(exit_.code, int):
        return exit_.code or 0
    print(exit_.code, file=sys.stderr)
    return 1


if __name__ == "__main__":
    serve()
