"""One owner per folder: `medsd fit` locks its run folder, `medsd sample` and `medsd evaluate`
their output folder, and a sweep each cell's folder while it runs the cell's stages.

The lock is the file `<folder>/.medsd.lock`, created with O_CREAT | O_EXCL (so exactly one of two
processes starting together gets it) and holding its owner as JSON: PID, host, command and start
time, plus the machine's boot id and the process's own start time (from /proc) to tell a reused
PID from its first owner. A second process on the folder is refused with one line naming the
owner. The lock is released when its owner is done (a `with` block, `released_on_return`, or at the
process's exit through atexit); one whose owner was killed stays behind and is *stale*:

- on the owner's host, a lock whose PID has ended, whose PID now belongs to a process started at
  another time, or which predates the machine's last boot is taken over, with a log line;
- a lock from another host is never taken over: medsd cannot see that host's processes, so the
  message says which file to remove once that process is known to be gone. (Processes in
  separate PID namespaces under one host name, such as containers sharing the host's network,
  are not told apart: give them separate host names.)

A process that holds a folder and enters it again (a second in-process `medsd fit` in a test or a
notebook) is let in. Under DDP only global rank 0 takes the lock (`for_rank`): the other ranks
are re-runs of its command writing into the same folder, and must not be refused by its lock.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from datamodules.atomic import write_atomically

log = logging.getLogger(__name__)

LOCK_NAME = ".medsd.lock"
# The rank variables of torchrun (RANK), Lightning's own launcher (LOCAL_RANK, NODE_RANK) and SLURM.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
# A lock that cannot be parsed is still being written (the few microseconds between its creation
# and its single write) for this long before it counts as damaged.
UNREADABLE_WAIT_S = 1.0

_held: list[RunLock] = []  # the locks this process has taken and not yet released


class FolderInUse(SystemExit):
    """Another process owns the folder. A SystemExit, so that a command ends with its one-line
    message rather than a traceback; the sweep catches it to skip a cell another sweep runs."""


def is_global_rank_zero() -> bool:
    return all(os.environ.get(name, "0") == "0" for name in RANK_VARIABLES)


def for_rank(folder: str | Path, rank: int | None = None) -> contextlib.AbstractContextManager:
    """`folder`'s lock for global rank 0 (`rank` None: the rank of the environment), and a
    do-nothing stand-in for the other ranks."""
    zero = is_global_rank_zero() if rank is None else rank == 0
    return RunLock(folder) if zero else contextlib.nullcontext()


@contextlib.contextmanager
def released_on_return():
    """Release, as the block ends, the locks taken in it and still held: `medsd fit` holds its run
    folder's past the point where it took it, up to its return, also when it runs in-process
    (tests, notebooks), where the process's exit would come too late."""
    before = list(_held)
    try:
        yield
    finally:
        for lock in [lock for lock in _held if lock not in before]:
            lock.release()


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat from the third on (the command name before them, in
    parentheses, may hold spaces); None without /proc or once the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22)."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields else None


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _this_process() -> dict:
    argv = sys.argv or ["python"]
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": shlex.join([Path(argv[0]).name, *argv[1:]]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "boot": _boot_id(),
        "process_start": _process_start(os.getpid()),
    }


def _is_this_process(holder: dict) -> bool:
    return (
        holder.get("pid") == os.getpid()
        and holder.get("host") == socket.gethostname()
        and holder.get("process_start") == _process_start(os.getpid())
    )


def _stale_reason(holder: dict) -> str | None:
    """Why the owner on this host is gone, or None while it may still run."""
    pid = holder.get("pid")
    if holder.get("boot") != _boot_id():
        return "the machine has restarted since"
    fields = _proc_stat(pid)
    if not _pid_exists(pid) or (fields and fields[0] == "Z"):  # a zombie: killed, not yet reaped
        return f"process {pid} has ended"
    recorded, current = holder.get("process_start"), _process_start(pid)
    if recorded is not None and current is not None and recorded != current:
        return f"PID {pid} now belongs to another process"
    return None  # alive, or /proc hides it (another user's process): taken to be alive


def _describe(holder: dict) -> str:
    return (
        f"PID {holder.get('pid')} on {holder.get('host')} since {holder.get('started')} "
        f"({holder.get('command')})"
    )


@contextlib.contextmanager
def _serialised(path: Path):
    """An exclusive flock on the lock file, so that of two processes taking over one stale lock
    the second finds it replaced. Where the filesystem has no flock (Lustre mounted without it,
    some FUSE mounts; NFS, which wants a writable file for it) the takeover goes on unserialised."""
    with open(path, "rb") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX)
        except OSError as error:
            if error.errno not in (errno.ENOSYS, errno.ENOTSUP, errno.ENOLCK, errno.EBADF):
                raise
        yield file


class RunLock:
    """`with RunLock(folder): ...` owns `folder` for the block; `RunLock(folder).acquire()` until
    `release()` or the process's exit. Raises FolderInUse while another process owns it."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._content: bytes | None = None  # what this object wrote, while it holds the lock
        self._pid = os.getpid()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> RunLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        content = json.dumps(_this_process()).encode()
        # Each round either takes the lock, refuses, or saw the lock change under it (released or
        # taken over by another process meanwhile) and looks again.
        for _ in range(3):
            if self._create(content):
                break
            seen = self._read()
            if seen is None:
                continue
            raw, holder = seen
            if _is_this_process(holder):
                return self  # entered again by its owner: the first entry releases it
            reason = self._stale_or_refuse(holder)
            if self._take_over(raw, content):
                log.warning("%s: taking over the lock of %s: %s", self.folder, _describe(holder), reason)
                break
        else:
            raise FolderInUse(
                f"{self.folder}: its lock {self.path} keeps changing; another process is taking it"
            )
        self._content = content
        _held.append(self)
        atexit.register(self.release)
        return self

    def release(self) -> None:
        # A forked child (a DataLoader worker) inherits this object: only the owner releases.
        if self._content is None or os.getpid() != self._pid:
            return
        atexit.unregister(self.release)
        _held.remove(self)
        with contextlib.suppress(FileNotFoundError):
            if self.path.read_bytes() == self._content:
                self.path.unlink()
        self._content = None

    def _create(self, content: bytes) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as file:
            file.write(content)  # one write: a reader sees it all, or an empty file for an instant
        return True

    def _read(self) -> tuple[bytes, dict] | None:
        """The lock's bytes and owner; None once it is gone."""
        deadline = time.monotonic() + UNREADABLE_WAIT_S
        while True:
            try:
                raw = self.path.read_bytes()
            except FileNotFoundError:
                return None
            with contextlib.suppress(ValueError):
                holder = json.loads(raw)
                if isinstance(holder, dict) and isinstance(holder.get("pid"), int) and holder["pid"] > 0:
                    return raw, holder
            if time.monotonic() > deadline:
                raise FolderInUse(
                    f"{self.folder}: its lock {self.path} names no owner (a process killed as it took "
                    f"the lock?); if no medsd process uses the folder, remove the file"
                )
            time.sleep(0.05)

    def _stale_or_refuse(self, holder: dict) -> str:
        """Why the owner's lock is stale; FolderInUse while it may still run."""
        if holder.get("host") != socket.gethostname():
            raise FolderInUse(
                f"{self.folder} is in use by {_describe(holder)}, another host, so medsd cannot tell "
                f"whether it still runs: if it does not, remove {self.path}"
            )
        reason = _stale_reason(holder)
        if reason is None:
            raise FolderInUse(
                f"{self.folder} is in use by {_describe(holder)}; wait for it to end or stop it"
            )
        return reason

    def _take_over(self, seen: bytes, content: bytes) -> bool:
        """Replace the stale lock `seen` with `content`; False if it changed meanwhile."""
        try:
            with _serialised(self.path) as file:
                if os.fstat(file.fileno()).st_ino != self.path.stat().st_ino or file.read() != seen:
                    return False
                write_atomically(self.path, lambda tmp: tmp.write_bytes(content))
        except FileNotFoundError:
            return False
        return True
