"""Atomic file writes: a crash leaves the old file or the new one, never half of either.

A write goes to a temp file beside the destination (`.<name>.<random>.tmp`), is flushed, given the
permissions the user's umask allows (so colleagues on a shared cluster can read results), and renamed
onto the destination. A full disk becomes a `DiskFullError` that names the directory and the bytes needed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from pcamx.runtime.errors import OutputError, UserError

TEMP_SUFFIX = ".tmp"


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _read_umask()


class DiskFullError(UserError, OSError):
    """A write failed for lack of space; says where, how much was needed and how much was free."""

    def __init__(self, path: Path, needed: int | None):
        free = shutil.disk_usage(path.parent).free if path.parent.exists() else None
        need = f"about {needed:,} bytes" if needed else "more space"
        have = f"{free:,} bytes are free" if free is not None else "free space unknown"
        super().__init__(errno.ENOSPC, f"no space left on device: writing {path.name} into {path.parent} needs {need}, "
                         f"{have} there; free some space or write elsewhere (e.g. hydra.run.dir=/other/disk/...)")
        self.path, self.needed, self.free = path, needed, free


def _is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # torch.save's zip writer reports a short write as "... unexpected pos N vs M" instead of ENOSPC.
    return isinstance(err, RuntimeError) and "unexpected pos" in str(err)


@contextlib.contextmanager
def atomic_path(path: str | Path, needed: int | None = None) -> Iterator[Path]:
    """Yield a temp path in the destination's directory; rename it onto `path` if the block succeeds.
    `needed` (bytes, an estimate) goes into the message when the disk is full."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        if _is_disk_full(err) and not isinstance(err, DiskFullError):
            raise DiskFullError(path, needed) from err
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp directory beside `path`; if the block succeeds it replaces `path` (an old one is removed
    first), else it is deleted. Readers see the old directory or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~UMASK)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Delete the temp files that writes killed mid-way left in `directory` and its subfolders (call it
    only on a directory this process owns: another writer's temp file looks the same)."""
    removed = []
    for tmp in Path(directory).rglob(f".*{TEMP_SUFFIX}"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _write(path: str | Path, mode: str, writer: Callable[[IO], None], needed: int | None) -> Path:
    with atomic_path(path, needed) as tmp, open(tmp, mode) as f:
        writer(f)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    data = text.encode()
    return _write(path, "wb", lambda f: f.write(data), len(data))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=jsonable) + "\n")


def tensor_bytes(obj: Any) -> int:
    """Bytes of all tensors in a nested dict/list structure: what a torch.save of it needs, roughly."""
    import torch  # here, not at the top: the sweeper's and the report's processes need no torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def torch_save(obj: Any, path: str | Path) -> Path:
    import torch

    return _write(path, "wb", lambda f: torch.save(obj, f), tensor_bytes(obj))


def byte_progress(total: int | None, desc: str, enabled: bool = True, initial: int = 0) -> Any:
    """A tqdm bar counting bytes (shown only on a terminal, and only when `enabled`)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                disable=None if enabled else True)


def file_digest(path: str | Path, algorithm: str = "sha256", progress: bool = False) -> str:
    """Hex digest of a file's bytes (md5 for the published PCam archives, sha256 for everything pcamx records)."""
    path = Path(path)
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f, byte_progress(path.stat().st_size, f"{algorithm} {path.name}", progress) as bar:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def sha256_file(path: str | Path, progress: bool = False) -> str:
    return file_digest(path, "sha256", progress)


def jsonable(value: Any) -> Any:
    """What json.dumps cannot write by itself: numpy/torch scalars, paths, devices."""
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path) or type(value).__module__ == "torch":  # a torch.device, without importing torch
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def check_writable(path: str | Path, flag: str) -> Path:
    """`path` if a file can be written there (checked before any work, by creating and removing a temp file beside
    it); an OutputError naming `flag` (the option that gave it) and the directory otherwise."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputError(f"{flag} {path} is a directory; give the path of a file to write")
    if not path.parent.is_dir():
        raise OutputError(f"{flag} {path}: the directory {path.parent} does not exist; create it first, or give "
                          f"{flag} a path in an existing directory")
    try:
        tempfile.TemporaryFile(dir=path.parent).close()
    except OSError as err:
        raise OutputError(f"{flag} {path}: cannot write in {path.parent} ({err.strerror}); give {flag} a path in "
                          "a writable directory") from None
    return path
