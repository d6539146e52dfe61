"""Writers: the writer thread and the atomic commit every output format shares (the compute loop never waits on
disk; the output appears under its final name only when complete, a file or a folder). The formats' own sinks
live in `formats/`."""
from __future__ import annotations

import errno
import os
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError, S2Error
from .fsutil import fsync_rename, human_bytes, pid_alive, remove_path, write_behind, write_error
from .items import Layout, StoredItem

LAYOUT_VERSION = 1
# bytes written between two calls asking the kernel to write a shard out (fsutil.write_behind): a batch of large
# features each time, small ones (pooled vectors) every few batches, so that a disk's latency is not waited for
# every small batch (the threshold RocksDB calls bytes_per_sync)
WRITE_BEHIND_BYTES = 8 << 20


def check_output_file(path: Path, overwrite: bool = True, directory: bool = False) -> None:
    """Refuse a single-file output that cannot be written: something other than a file under its name (a folder,
    for a format whose output is a `directory`), a file already there (unless `overwrite`), or no folder to put it
    in."""
    if path.exists() and (path.is_dir() != directory or path.is_symlink()):
        what = "a folder" if directory else "a file"
        raise ConfigError(f"output path exists and is not {what}", given=str(path), fix="choose another -o path")
    if path.exists() and not overwrite:
        raise ConfigError("output file exists", given=str(path),
                          fix="pass --overwrite, or -o OUTDIR/ for a resumable run")
    if not path.parent.exists():
        raise ConfigError("output folder does not exist", given=str(path.parent), fix="create it first")


def remove_dead_temporaries(path: Path) -> list[Path]:
    """Remove the temporaries `.NAME.tmp-PID` beside a single-file output whose process is gone (a killed run's);
    the caller holds the output's claim, so no live run of it writes them. Returns what was removed."""
    import glob

    gone = []
    for p in Path(path).parent.glob(glob.escape(f".{Path(path).name}.tmp-") + "*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            remove_path(p)
            gone.append(p)
    return gone


class ThreadedSink:
    """The writer thread and the atomic commit shared by every format. The output is written under a temporary
    name `self.tmp` (a file, or with `directory` a folder the subclass fills) and renamed into place whole.
    Subclasses implement `_open`, `_append(items)`, `_finish()` (`self.failures` is final then) and `_discard`."""

    need_bytes: int | None = None  # what a complete shard will take, for the message when the disk is full
    need_floor = False  # need_bytes counts the arrays alone (no shard of the run measured yet): a lower bound
    guard = False  # True: the final rename replaces only `replaces` (see fsutil.fsync_rename), never a newcomer
    replaces: tuple[int, int, int] | None = None

    def __init__(self, path: str | os.PathLike, attrs: dict[str, Any], layout: Layout, queue_size: int = 4,
                 directory: bool = False):
        self.path = Path(path)
        self.directory = directory
        check_output_file(self.path, directory=directory)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        if directory:
            remove_path(self.tmp)
            self.tmp.mkdir()
        self.attrs, self.layout = attrs, layout
        self.failures: list[dict[str, str]] = []
        self.keys: list[str] = []
        self.n = 0
        self.busy_s = 0.0  # seconds the writer thread spent writing (the run's "write" stage)
        self._behind = 0  # bytes appended since the shard was last asked to go to disk
        self._q: queue.Queue = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self._end_error: BaseException | None = None  # what failed in `_end` (raised by `wait`)
        self._then: Callable[[Path], None] | None = None
        self._aborted = False
        self._open()
        self._thread = threading.Thread(target=self._run, name="s2cli-writer", daemon=True)
        self._thread.start()

    def write(self, items: list[StoredItem]) -> None:
        """Queue entries (`items.StoredItem`). Blocks only when the queue is full."""
        self._raise_if_failed()
        self._q.put(items)

    def fail(self, record: dict[str, str]) -> None:
        self.failures.append(record)

    def close(self) -> Path:
        """Flush, record failures, fsync and rename into place. Returns the final path."""
        self.end()
        return self.wait()

    def end(self, then: Callable[[Path], None] | None = None) -> None:
        """Queue the end of the file and return at once: the writer thread writes what is left (the format's
        serialisation included), fsyncs and renames it into place, then runs `then(path)` (a folder's shard: its
        hash and done marker, so the marker is still written last). `wait()` says how it went."""
        self._then = then
        self._q.put(None)

    def wait(self) -> Path:
        """Wait for `end` to be done; the final path, or what failed (the file then removed)."""
        self._thread.join()
        if self._end_error is not None:
            raise self._end_error
        if self._error is not None:  # a write failed (the file emptied then): nothing of it stays
            remove_path(self.tmp)
        self._raise_if_failed()
        return self.path

    @property
    def ended(self) -> bool:
        """The writer thread is done (after `end`: `wait` returns at once)."""
        return not self._thread.is_alive()

    def _end(self) -> None:
        """On the writer thread, after the last write: finish, fsync and rename, then `then`. A failure is kept for
        `wait` (as `close` raised it before): a file that appeared under the name, a full disk, an S2Error."""
        t = time.perf_counter()
        try:
            self._finish()
            fsync_rename(self.tmp, self.path, self.guard, self.replaces)
        except FileExistsError as e:
            self._end_error = self._appeared()
            self._end_error.__cause__ = e
            return
        except Exception as e:  # h5py reports a full disk as OSError or RuntimeError
            self._discard()
            remove_path(self.tmp)
            # an S2Error already says what went wrong (a safetensors header over its limit)
            self._end_error = e if isinstance(e, S2Error) else write_error(self.path, e, self.need_bytes, floor=self.need_floor)
            self._end_error.__cause__ = e if self._end_error is not e else None
            return
        finally:
            self.busy_s += time.perf_counter() - t
        if self._then is not None:
            t = time.perf_counter()
            try:
                self._then(self.path)
            except BaseException as e:
                self._end_error = e
            finally:
                self.busy_s += time.perf_counter() - t

    def _appeared(self) -> S2Error:
        """A file appeared under the output's name while this run wrote it: it stays, and this run's complete
        file is kept beside it under a name of its own."""
        kept = self.path.with_name(f"{self.path.stem}.{os.getpid()}{self.path.suffix}")
        try:
            if self.directory:
                os.rename(self.tmp, kept)
            else:
                os.link(self.tmp, kept)
                self.tmp.unlink()
        except OSError:
            kept = self.tmp
        return S2Error(f"{self.path} appeared while this run was writing it (another run?); it was left as it is",
                       given=str(self.path), fix=f"this run's features are complete in {kept}: rename it, or rerun "
                       "with another -o")

    def abort(self) -> None:
        """Drop everything: the final path is never created."""
        self._aborted = True
        try:
            self._q.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout=5)
        try:
            self._discard()
        finally:
            remove_path(self.tmp)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise write_error(self.path, self._error, self.need_bytes, floor=self.need_floor) from self._error

    def _run(self) -> None:
        while True:
            items = self._q.get()
            if items is None:
                if self._error is None and not self._aborted:
                    self._end()
                return
            if self._error is None:
                try:
                    t = time.perf_counter()
                    nbytes = sum(it.nbytes for it in items)
                    self._reserve(nbytes)
                    self._append(items)
                    self.keys.extend(it.key for it in items)
                    self.n += len(items)
                    self._behind += nbytes
                    if self._behind >= WRITE_BEHIND_BYTES:  # on its way to disk while the run goes on: the fsync
                        write_behind(self.tmp)  # at the end waits less
                        self._behind = 0
                    self.busy_s += time.perf_counter() - t
                except BaseException as e:  # surfaced to the producer on its next call
                    self._error = e
                    self._discard()  # at once: on a full disk, the sooner the file is emptied the better

    def _reserve(self, nbytes: int) -> None:
        """Refuse a write the disk cannot hold before the format library tries it (HDF5 left half-written by a
        full disk cannot be closed cleanly). 1 MiB of headroom covers chunk and header overhead."""
        free = shutil.disk_usage(self.tmp.parent).free
        if nbytes + (1 << 20) > free:
            raise OSError(errno.ENOSPC, f"{human_bytes(nbytes)} to write + 1 MiB headroom, {human_bytes(free)} free", str(self.tmp))

    # format-specific
    def _open(self) -> None: ...
    def _append(self, items: list[StoredItem]) -> None: ...
    def _finish(self) -> None: ...
    def _discard(self) -> None: ...
