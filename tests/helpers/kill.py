"""`medsd` killed by SIGKILL at a chosen rename, as a kill -9 at the worst moment would leave it.

    python -m tests.helpers.kill before last.ckpt 1 fit --config ...

runs `medsd fit --config ...` and kills it (no cleanup, no finally, no atexit) at the first
rename onto a file or folder named `last.ckpt`, just before it (`before`) or just after (`after`).
Every atomic write in medsd ends in such a rename (checkpoints: os.replace; exports: a rename of
the previous folder aside, then of the new one into place), so these are the moments a kill
could cut. Torch runs one thread, as in the tests' own processes, so the runs compare bit for bit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def kill_at_rename(when: str, name: str, nth: int) -> None:
    """Patch os.replace and os.rename (pathlib's rename calls the latter) to kill this process."""
    seen = 0

    def patched(rename):
        def wrapper(src, dst, *args, **kwargs):
            nonlocal seen
            hit = Path(dst).name == name and (seen := seen + 1) == nth
            if hit and when == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            result = rename(src, dst, *args, **kwargs)
            if hit and when == "after":
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        return wrapper

    os.replace, os.rename = patched(os.replace), patched(os.rename)


def run_killed(when: str, name: str, nth: int, *medsd_args: str) -> None:
    """Run `medsd ARGS` in a child killed at the `nth` rename onto `name`; assert it was."""
    command = [sys.executable, "-m", "tests.helpers.kill", when, name, str(nth), *medsd_args]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, f"not killed (rc {done.returncode}):\n{done.stderr[-3000:]}"


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    kill_at_rename(sys.argv[1], sys.argv[2], int(sys.argv[3]))
    from experiments.cli import main

    args, sys.argv = sys.argv[4:], sys.argv[:1]  # LightningCLI warns when it is given both
    main(args)
