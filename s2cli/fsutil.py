"""File-system primitives under the storage modules: atomic and exclusive writes, fsync + rename, whether a
process is alive, byte counts for people, and the one error for a failed write."""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from .errors import S2Error


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def write_error(path: Path, e: BaseException, need_bytes: int | None = None) -> S2Error:
    """The one error for a failed write. A full disk says so, with the space left and the space a shard needs;
    completed shards are untouched, so the fix is to make room and rerun."""
    if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e):
        try:
            free = f"{human_bytes(shutil.disk_usage(path.parent).free)} free"
        except OSError:
            free = "free space unknown"
        detail = getattr(e, "strerror", None) if getattr(e, "filename", None) else None  # a refused reservation
        need = f"; a whole shard needs about {human_bytes(need_bytes)}" if need_bytes else ""
        return S2Error(f"no space left on device writing {path} ({detail or free}{need})", given=str(path.parent),
                       fix="free space or point -o elsewhere, then rerun the same command: completed shards are "
                           "kept and the run continues after them")
    return S2Error(f"writing {path} failed: {type(e).__name__}: {e}",
                   fix="check free space and permissions of the output folder")


def _fsynced_tmp(path: Path, text: str) -> Path:
    """`text` written and fsynced beside `path`, under a temporary name that carries this process's id."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(path, e) from e
    return tmp


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` by `text` at once: a reader sees the old content or the new, never part of it."""
    tmp = _fsynced_tmp(path, text)
    try:
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(path, e) from e


def create_exclusive(path: Path, text: str) -> bool:
    """Write `path` only if it does not exist, atomically (the first of several writers wins). True if written."""
    tmp = _fsynced_tmp(path, text)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def fsync_rename(tmp: Path, final: Path) -> None:
    """Make the complete file `tmp` durable, then give it its final name (and make the rename durable too)."""
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    dfd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
