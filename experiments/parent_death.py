"""Stage processes that die with the process that started them, even when it is SIGKILLed.

A sweep starts each stage as `python -m experiments.cli STAGE ...` with MEDSD_PARENT_PID set to
its own PID (`child_environment`); `medsd` calls `die_with_parent` first thing, which asks Linux
to SIGKILL the process when its parent dies (prctl PR_SET_PDEATHSIG), checks that the parent is
still the one that started it (it may have died in the instant before the prctl), and sets the
variable to its own PID so that the medsd processes it starts in turn (the ranks Lightning's DDP
launcher runs as copies of its command) die with it.

Why this way: a SIGKILLed sweep runs no code, so only the kernel can end its children. Setting
the signal in the child between fork and exec (`preexec_fn`) is not safe while other threads run,
as they do in the parallel launcher; a wrapper process setting it before exec would not reach the
stage's own children, since the setting is not inherited by forked processes; a child polling its
parent would wake up for nothing and notice late. DataLoader workers (forked, not started through
`medsd`) are not covered: PyTorch ends them itself once their parent is gone (within 5 s).
Elsewhere than Linux the variable is ignored.
"""

from __future__ import annotations

import os
import signal
import sys

PARENT_ENV = "MEDSD_PARENT_PID"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def child_environment() -> dict[str, str]:
    """What to add to a child's environment so that it dies with this process."""
    return {PARENT_ENV: str(os.getpid())}


def die_with_parent() -> None:
    """When started with MEDSD_PARENT_PID: be SIGKILLed as the parent dies (see above)."""
    expected = os.environ.get(PARENT_ENV)
    # Set to this process's own PID once done: a second in-process `medsd` call has nothing to do.
    if expected in (None, str(os.getpid())) or not sys.platform.startswith("linux"):
        return
    import ctypes  # here: only the processes that asked for it pay for the import

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != int(expected):
        raise SystemExit(f"medsd: the process that started this one (PID {expected}) has ended")
    os.environ[PARENT_ENV] = str(os.getpid())
