"""File locks: one run per run directory, one generator per synthetic data directory.

A lock is an OS lock (`flock`) on a small file that also says who holds it (PID, host, Slurm job, start
time, command). The OS drops the lock when its process dies, however it dies, so a lock file left by a
killed run is simply taken over. Where the file system has no `flock`, a lock whose holder is a dead
process on this host is taken over, and one held from another host is respected.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pcamx.runtime import disk, run_files
from pcamx.runtime.errors import UserError

log = logging.getLogger("pcamx")
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class LockBusy(RuntimeError):
    """Another live process holds the lock."""

    def __init__(self, message: str, holder: dict[str, Any] | None):
        super().__init__(message)
        self.holder = holder


def holder_info() -> dict[str, Any]:
    slurm = os.environ.get("SLURM_ARRAY_JOB_ID")
    slurm = f"{slurm}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if slurm else os.environ.get("SLURM_JOB_ID")
    return {"pid": os.getpid(), "host": socket.gethostname(), "slurm_job": slurm,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)[:300]}


def describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process (its lock file is unreadable)"
    slurm = f", Slurm job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return f"PID {holder.get('pid')} on {holder.get('host')}{slurm}, since {holder.get('started')}"


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _alive_here(holder: dict[str, Any] | None) -> bool:
    """Whether the holder is a live process on this host (a holder on another host counts as alive)."""
    if not holder or holder.get("host") != socket.gethostname():
        return bool(holder)
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, TypeError, ValueError):
        return True
    return True


class FileLock:
    """An exclusive lock on `path`, held until `release()` (or the process's death)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self, wait: bool) -> dict[str, Any] | None:
        """Take the lock; with `wait`, block until it is free. Returns the previous holder's record when
        the lock was left behind by a process that is gone (taken over), else None. Raises LockBusy."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            previous = _read(self.path)
            try:
                self._lock(fd, wait, previous)
            except BaseException:
                os.close(fd)
                raise
            # A holder that released meanwhile unlinked the file we locked: lock the current one instead.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder_info()) + "\n").encode(), 0)
        self._fd = fd
        return previous if previous and previous.get("pid") else None

    def _lock(self, fd: int, wait: bool, previous: dict[str, Any] | None) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = _read(self.path)
            raise LockBusy(f"{self.path} is held by {describe(holder)}", holder) from None
        except OSError as err:
            if err.errno not in _NO_FLOCK:
                raise
            if _alive_here(previous) and previous.get("pid") != os.getpid():
                raise LockBusy(f"{self.path} is held by {describe(previous)}", previous) from None

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # first, so nobody locks a file that is about to disappear
        os.close(self._fd)  # closing drops the flock
        self._fd = None


class RunDirBusy(UserError, LockBusy):
    """The run directory belongs to a run that is still going."""


def claim_run_dir(run_dir: Path) -> FileLock:
    """Own `run_dir` for this run's life, or fail at once if a live run owns it."""
    lock = FileLock(run_dir / run_files.LOCK)
    try:
        previous = lock.acquire(wait=False)
    except LockBusy as err:
        raise RunDirBusy(
            f"{run_dir} is in use by another run ({describe(err.holder)}). Two runs in one directory would "
            "overwrite each other's checkpoints and results: give this run its own directory "
            "(hydra.run.dir=...), or wait for the other one to finish.", err.holder) from None
    if previous:
        log.info("run dir %s: taking over the lock left by %s, which is no longer running", run_dir,
                 describe(previous))
    return lock


@contextlib.contextmanager
def exclusive(path: Path, what: str) -> Iterator[None]:
    """Hold a blocking lock on `path` for the block, saying so when another process holds it first."""
    lock = FileLock(path)
    try:
        lock.acquire(wait=False)
    except LockBusy as err:
        log.info("waiting for %s to finish %s", describe(err.holder), what)
        lock.acquire(wait=True)
    try:
        yield
    finally:
        lock.release()


def snapshot_hydra_files(directory: Path) -> dict[Path, bytes]:
    """The .hydra/ files of a run directory as they are now (see `restore_hydra_files`)."""
    return {p: p.read_bytes() for p in directory.glob("*.yaml")} if directory.is_dir() else {}


def restore_hydra_files(directory: Path, files: dict[Path, bytes]) -> None:
    """Put back this run's .hydra/ files if a run refused entry meanwhile overwrote them (Hydra writes them
    before the refused run reaches its lock)."""
    for path, content in files.items():
        if not path.is_file() or path.read_bytes() != content:
            disk.write_text(path, content.decode())


def resolve_run_dir(run_dir: str | Path | None) -> Path:
    """`run_dir`, or Hydra's output directory for this job; created if it does not exist."""
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = HydraConfig.get().runtime.output_dir
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path
