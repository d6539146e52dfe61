"""File-system primitives under the storage modules: atomic and exclusive writes, fsync + rename, a written file's
pages started on their way to disk or dropped from the page cache, whether a process is alive, byte counts for
people, and the one error for a failed write."""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
from pathlib import Path
from typing import Any, Callable, TypeVar

from .errors import ConfigError, S2Error

T = TypeVar("T")

SPOOL_PREFIX = "s2cli-spool-"  # a remote output's local spool (store.new_spool): S2CLI_SPOOL/s2cli-spool-HOST-PID-*


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def write_error(path: Path, e: BaseException, need_bytes: int | None = None, fix: str | None = None,
                floor: bool = False) -> S2Error:
    """The one error for a failed write. A full disk says so, with the space left and the space a shard needs;
    completed shards are untouched, so the fix is to make room and rerun (`fix`: the writer's own words for it;
    `floor`: need_bytes counts the arrays alone, before any shard of the run was measured)."""
    if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e):
        try:
            free = f"{human_bytes(shutil.disk_usage(path.parent).free)} free"
        except OSError:
            free = "free space unknown"
        detail = getattr(e, "strerror", None) if getattr(e, "filename", None) else None  # a refused reservation
        detail = None if detail == os.strerror(errno.ENOSPC) else detail  # the kernel's own words: the space left instead
        need = (f"; a whole shard needs {'at least' if floor else 'about'} {human_bytes(need_bytes)}"
                f"{' (its arrays alone)' if floor else ''}" if need_bytes else "")
        spool = next((p for p in path.parents if p.name.startswith(SPOOL_PREFIX)), None)
        if spool is not None:  # what ran out is the local spool of a remote output, not the output
            return S2Error(f"no space left in the local spool of a remote output ({spool.parent}, S2CLI_SPOOL) "
                           f"writing {path.name} ({detail or free}{need})", given=str(spool.parent),
                           fix="free space there, or set S2CLI_SPOOL to a folder on a disk with room for a shard per "
                               "rank, then rerun the same command: completed shards are kept")
        return S2Error(f"no space left on device writing {path} ({detail or free}{need})", given=str(path.parent),
                       fix=fix or "free space or point -o elsewhere, then rerun the same command: completed shards "
                                  "are kept and the run continues after them")
    if getattr(e, "errno", None) == errno.EIO:  # the disk itself failed (seen writing pages out, or in a write)
        return S2Error(f"the disk failed writing {path}: input/output error", given=str(path.parent),
                       fix="check the device (`dmesg`) or point -o at another disk, then rerun the same command: "
                           "completed shards are kept and the run continues after them")
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


def file_identity(path: Path) -> tuple[int, int, int] | None:
    """What tells one file from another under the same name (device, inode, mtime); None when there is none."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns


def _fsync_path(path: Path) -> None:
    """fsync a file, or every file of a folder and the folders themselves."""
    if not path.is_dir():
        with open(path, "rb+") as fh:
            os.fsync(fh.fileno())
        return
    for p in sorted(path.rglob("*")) + [path]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _sync_file_range() -> Any:
    """libc's sync_file_range (Linux), or None."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError, TypeError):  # no such function (macOS), or no C library to open by None (Windows)
        return None
    fn.argtypes, fn.restype = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint), ctypes.c_int
    return fn


SYNC_FILE_RANGE = _sync_file_range()
# wait for the range's pages already being written out (a page written again since is skipped by WRITE alone),
# then start writing out its dirty pages, without waiting for those
SYNC_FILE_RANGE_WAIT_BEFORE, SYNC_FILE_RANGE_WRITE = 1, 2
UNSUPPORTED = {errno.EINVAL, errno.ESPIPE, errno.ENOSYS, errno.EOPNOTSUPP}  # what a file system without it says


def write_behind(path: Path) -> None:
    """Start writing a file's dirty pages (or those of every file in a folder) to disk now: the disk works while the
    run goes on, so that the fsync at the shard's end has little left to wait for, and a shard's written pages do
    not all wait in memory until then (RocksDB's `bytes_per_sync`, PostgreSQL's `backend_flush_after`). It waits
    only for what the previous call started (so at most that much is in flight), not for the pages it starts: when
    it returns, no page of the file is dirty. A failure of the disk seen while waiting (EIO, or ENOSPC where space is
    allocated at writeback) is raised here, as the write's own error: this call is where the kernel reports it, and
    the fsync at the end would then not. Nothing where sync_file_range does not exist (not Linux) or a file system
    does not support it, nor for a file that cannot be opened."""
    if SYNC_FILE_RANGE is None:
        return
    for p in (sorted(q for q in path.rglob("*") if q.is_file()) if path.is_dir() else [path]):
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            if SYNC_FILE_RANGE(fd, 0, 0, SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE) != 0:
                err = ctypes.get_errno()
                if err not in UNSUPPORTED:
                    raise OSError(err, os.strerror(err), str(p))
        finally:
            os.close(fd)


def drop_cached(files: list[Path]) -> None:
    """Ask the kernel to drop written, fsynced files' pages from the page cache, so that the next shard's writes
    reuse them: a run writing terabytes neither grows the page cache by every shard (the kernel then reclaims, or
    maps fresh memory, for each page written) nor evicts other processes' cache. Best effort: a file gone, or a
    platform without posix_fadvise, is left as it is."""
    if not hasattr(os, "posix_fadvise"):
        return
    for p in files:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def remove_path(path: Path) -> None:
    """Remove a file or a folder with everything in it; nothing there is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def fsync_rename(tmp: Path, final: Path, guard: bool = False, replaces: tuple[int, int, int] | None = None) -> None:
    """Make the complete file (or folder) `tmp` durable, then give it its final name (and make the rename durable
    too). `guard`: replace only the file `replaces` (its `file_identity` when the run began; None: nothing), never a
    file that appeared under the name since: FileExistsError then, and `tmp` stays. A folder replaces a folder
    by removing it first (not atomically: a reader may see neither for a moment)."""
    _fsync_path(tmp)
    folder = tmp.is_dir()
    if guard and replaces is not None and file_identity(final) not in (None, replaces):
        raise FileExistsError(errno.EEXIST, "another file appeared under this name during the run", str(final))
    if folder:
        if file_identity(final) is not None and (not guard or replaces is not None):
            remove_path(final)
        try:
            os.rename(tmp, final)  # onto a folder that appeared meanwhile (not empty): refused
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
                raise FileExistsError(errno.EEXIST, "another file appeared under this name during the run", str(final)) from e
            raise
    elif not guard:
        os.replace(tmp, final)
    elif replaces is None or file_identity(final) is None:
        os.link(tmp, final)  # never replaces: FileExistsError when a file appeared under the name
        os.unlink(tmp)
    else:
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


class Claim:
    """An exclusive claim on an output, held while this process lives: a lock file, `flock`ed and carrying the
    holder's host, pid and start time. The kernel drops the lock when its process ends, however it ends (kill -9
    included), so a dead claim is simply taken over; `release()` removes the file. On a file system without
    locks nothing is held (`held` is False) and the heartbeats alone tell a live run."""

    def __init__(self, path: Path, fd: int | None):
        self.path, self.fd = path, fd

    @property
    def held(self) -> bool:
        return self.fd is not None

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                self.path.unlink()  # while still locked: a waiting claimant finds the file gone and retries
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def _holder(fd: int) -> str:
    """Who holds a claim, from its lock file: `host H pid P since T`."""
    import json
    import time

    try:
        h = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(h["started"])))
        return f"host {h['host']} pid {h['pid']} since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that is just starting"


def take_claim(path: Path, what: str, fix: str, info: dict | None = None) -> Claim:
    """Claim `what` through the lock file `path` (created if missing) before anything of it is read or written. A
    live holder is refused (ConfigError naming its host and pid, with `fix`); a dead one is taken over. `info`: more
    fields for the lock file's record (what `claim_record` tells other processes)."""
    import fcntl
    import json
    import socket
    import time

    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # a read-only folder or mount: said before any work, in one line
            raise ConfigError(f"cannot write in {path.parent} ({e.strerror or e})", given=str(path.parent),
                              fix="check the permissions of the output folder, or pass another -o") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise ConfigError(f"{what} is being written by another run ({holder})", given=str(path.parent),
                              fix=fix) from None
        except OSError:  # no locks on this file system (ENOLCK, EOPNOTSUPP): the heartbeats still refuse a live run
            os.close(fd)
            return Claim(path, None)
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)  # its holder released it between our open and our lock: claim the new file
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), **(info or {})}
    try:  # for the message another run gets; the lock is what counts (a full disk is no reason to stop here)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
    except OSError:
        pass
    return Claim(path, fd)


def claim_record(path: Path) -> dict | None:
    """The record the holder of the lock file `path` wrote (host, pid, started and its `info`), {} while it is
    being written; None when nobody holds it."""
    return _while_held(path, _record)


def claim_held(path: Path) -> str | None:
    """Who holds the claim of the lock file `path` now (`host H pid P since T`), or None when nobody does."""
    return _while_held(path, _holder)


def _while_held(path: Path, read: Callable[[int], T]) -> T | None:
    """`read(fd)` of the lock file `path` while another process holds its claim (its exclusive lock); None when
    nobody does, or the file cannot be opened."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return read(fd)
    except OSError:
        return None
    finally:
        os.close(fd)


def _record(fd: int) -> dict:
    """A claim's record from its lock file, {} while it is being written."""
    import json

    try:
        rec = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return rec if isinstance(rec, dict) else {}
