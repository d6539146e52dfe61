"""The decode stage: samples decoded by torch DataLoader workers, in input order, a bounded window in flight; a
decode that stalls recorded after a timeout, a dead worker's sample decoded again by a new loader."""
from __future__ import annotations

import ctypes
import math
import mmap
import multiprocessing as mp
import os
import signal
import stat
import tempfile
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, get_worker_info

from ..errors import ConfigError, S2Error
from ..heap import keep_freed_memory
from .decode import Decoded, Fit, decode_sample
from .samples import Sample, failure

DECODE_NICE = 10  # niceness added to decode workers (S2CLI_DECODE_NICE overrides); chosen by benchmarks/bench_overlap.py
DEATHS = 3  # (three) a sample in flight on this many decode workers that died is recorded as failed: it likely kills them
# a decode worker hands each tensor's shared memory over through a unix socket that multiprocessing makes in the
# temporary folder (TEMP/pymp-XXXXXXXX/listener-XXXXXXXX): its path may not pass 107 bytes, so TEMP not 75
SOCKET_DIR_MAX = 107 - len("/pymp-XXXXXXXX/listener-XXXXXXXX")
SHORT_TEMP_DIRS = ("/tmp", "/dev/shm", "/var/tmp")
POLL_S = 0.25  # how often the wait for a decoded sample looks at the workers and the sample's deadline


def decode_nice() -> int:
    """How much lower than the main process the decode workers run (0..19). The main process drives the
    device (CUDA kernel launches, or the forward's threads on a CPU), so workers that only fill its idle time
    keep the forward from waiting; S2CLI_DECODE_NICE=N overrides the default."""
    raw = os.environ.get("S2CLI_DECODE_NICE", "").strip()
    if not raw:
        return DECODE_NICE
    try:
        n = int(raw)
    except ValueError:
        raise ConfigError("S2CLI_DECODE_NICE must be an integer", given=raw, expected="0..19",
                          fix="unset it, or set e.g. S2CLI_DECODE_NICE=10") from None
    if not 0 <= n <= 19:
        raise ConfigError("S2CLI_DECODE_NICE is out of range", given=n, expected="0..19", fix="use e.g. 10")
    return n


def _close_inherited_files() -> None:
    """Close the regular files a worker inherited from the run (an output shard being written): a worker holding
    one keeps its HDF5 file lock alive after the run closed it, and the run could not read the shard back. A loader
    started again mid-run (after a worker died) inherits the shard in flight. Pipes, sockets and stdio stay."""
    try:
        fds = [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:  # not Linux: nothing to do here
        return
    for fd in fds:
        if fd < 3:
            continue
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
        except OSError:  # the listing's own fd, gone already
            pass


def _exited(pid: int) -> bool:
    """Whether the worker `pid` (a child of this process) has ended, without reaping it (its pid stays ours)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # reaped already (the DataLoader's own liveness check)
        return True


def _as_is(rec: Any) -> Any:
    """The loader's collate_fn: a record goes out as the worker made it."""
    return rec


def _to_shared(rec: Decoded) -> Decoded:
    """In a worker: the record's arrays as torch tensors, which torch moves into shared memory as the loader sends
    them (only a handle crosses the pipe)."""
    return rec.map_arrays(lambda a: torch.from_numpy(a) if isinstance(a, np.ndarray) else a)


def _from_shared(rec: Decoded) -> Decoded:
    """In the run: the shared tensors viewed as numpy arrays again (no copy)."""
    return rec.map_arrays(lambda a: a.numpy() if isinstance(a, torch.Tensor) else a)


def socket_temp_dir() -> str | None:
    """The folder the decode workers make their sockets in: None (the temporary folder, as usual) when its path is
    short enough, else the first short one that can be written (TMPDIR is often deep on clusters); a ConfigError
    when there is none."""
    base = tempfile.gettempdir()
    if len(base) <= SOCKET_DIR_MAX:
        return None
    for d in SHORT_TEMP_DIRS:
        if os.path.isdir(d) and os.access(d, os.W_OK | os.X_OK):
            return d
    raise ConfigError("the temporary folder's path is too long for the decode workers' sockets",
                      given=f"{base} ({len(base)} bytes)", expected=f"at most {SOCKET_DIR_MAX} bytes",
                      fix="set TMPDIR to a shorter folder, or decode in the run's process with -j 0")


def ring_slot_bytes(fit: Fit) -> int:
    """The bytes of one slot of the pixel ring: an image fitted to a square of the largest scale, (3, side, side)
    uint8 (pixels of another size, a strategy's views, go as tensors); 0 (no ring) where the workers send JPEG
    bytes (`--decode torch`)."""
    return 3 * fit.side * fit.side if fit.decode == "pil" else 0


class PixelRing:
    """Slots of shared memory for decoded pixels, mapped once before the decode workers fork (anonymous and shared:
    no file, no /dev/shm entry) and reused: a worker copies an image's fitted pixels into the slot its sample was
    handed with, and only the slot's number and the array's shape cross the pipe. A tensor's own trip (a fresh
    shared-memory segment per image, its file descriptor passed through a socket, its pages faulted in on both
    sides and unmapped again) costs more than the image's copy. In the run a slot's pixels are a numpy array
    over the slot; the slot is free again when the last array or tensor over it is gone (a weak reference to the
    array every view keeps alive), so a slot is never written while anything reads it. Free slots are taken
    last-freed first (the pages already touched); with none free, or pixels that do not fit, a sample goes the
    tensor's way. When pixels die no Python code runs (the weak reference's callback is a deque's C `append`): a
    Python callback there (`weakref.finalize`) would be where a Ctrl-C or a stop signal lands now and then, and
    Python drops an exception raised in it: the signal would be lost."""

    def __init__(self, slots: int, slot_bytes: int):
        self.slots, self.slot_bytes = slots, slot_bytes
        self.mem = mmap.mmap(-1, slots * slot_bytes)  # MAP_SHARED | MAP_ANONYMOUS: shared with the forked workers
        self.free: deque[int] = deque(range(slots - 1, -1, -1))
        # id of the weak reference to each slot's array in the run -> (the reference, kept so that it calls back; the
        # slot); an array cannot be a key (numpy arrays do not hash, nor do references to them)
        self._slot_of: dict[int, tuple[weakref.ref, int]] = {}
        self._dead: deque[weakref.ref] = deque()  # those whose array died (appended by the reference, in C)

    def release(self, slot: int) -> None:
        """`slot` free again (its pixels gone, or never written: the sample failed, or its worker is gone)."""
        self.free.append(slot)

    def reclaim(self) -> None:
        """The slots whose arrays died since the last look, free again."""
        while self._dead:
            self.release(self._slot_of.pop(id(self._dead.popleft()))[1])

    def take(self) -> int:
        """A free slot's number, or -1 when all are in use."""
        self.reclaim()
        try:
            return self.free.pop()
        except IndexError:
            return -1

    def put(self, slot: int, rec: Decoded) -> tuple[int, ...] | None:
        """In a worker: the record's pixels copied into `slot` (and dropped from the record); their shape, or None
        when they do not fit in a slot (left in the record)."""
        a = rec.pixels
        if slot < 0 or not isinstance(a, np.ndarray) or a.dtype != np.uint8 or a.nbytes > self.slot_bytes:
            return None
        dst = np.frombuffer(self.mem, np.uint8, count=a.size, offset=slot * self.slot_bytes).reshape(a.shape)
        np.copyto(dst, a)
        rec.pixels = None
        return a.shape

    def view(self, slot: int, shape: tuple[int, ...]) -> np.ndarray:
        """In the run: the pixels a worker put in `slot`, as an array over the slot; the slot is taken until the
        array and every view of it are gone."""
        base = np.frombuffer(self.mem, np.uint8, count=math.prod(shape), offset=slot * self.slot_bytes)
        ref = weakref.ref(base, self._dead.append)  # views (numpy's, torch's) keep `base` alive
        self._slot_of[id(ref)] = (ref, slot)
        return base.reshape(shape)


class _Decoding:
    """The map-style dataset the loader's workers index: an index is (seq, sample, slot), the item (seq, record,
    shape of its pixels in the ring's `slot`, or None). Which sample each worker is decoding (`busy`) and each
    worker's pid are kept in shared memory: the run knows what a worker that died held."""

    def __init__(self, fit: Fit, workers: int, ring_slots: int = 0):
        ctx = mp.get_context("fork")
        self.fit, self.nice = fit, decode_nice()
        self.busy = ctx.RawArray("q", workers)  # per worker: the seq of the sample it decodes, -1 between samples
        self.pids = ctx.RawArray("q", workers)  # per worker: its pid, once started (0 before)
        self.socket_dir = socket_temp_dir()
        slot_bytes = ring_slot_bytes(fit)
        self.ring = PixelRing(ring_slots, slot_bytes) if ring_slots and slot_bytes else None

    def __getitem__(self, index: tuple[int, Sample | dict, int]) -> tuple[int, Decoded, tuple[int, ...] | None]:
        seq, s, slot = index
        w = get_worker_info().id  # type: ignore[union-attr]
        self.busy[w] = seq
        rec = Decoded.failed(s) if isinstance(s, dict) else decode_sample(s, self.fit)
        self.busy[w] = -1
        shape = self.ring.put(slot, rec) if self.ring is not None else None
        return seq, _to_shared(rec), shape

    def init_worker(self, worker_id: int) -> None:
        """In each worker as it starts. Ctrl-C reaches the whole process group: only the parent acts on it (a worker
        killed by it could die holding the loader's result-queue lock); SIGTERM (the loader's own shutdown) ends a
        worker at once, whatever handler the parent had when it forked; SIGUSR1 (SLURM's warning before the time
        limit, sent to every process of a step) is the parent's to act on. A worker ends with the run however the
        run ends (SIGKILL too: Linux's parent-death signal), even one blocked in a read that never returns. The
        worker runs `nice` lower than the run, closes the output files it inherited, keeps the memory it frees
        for the next image (`heap.keep_freed_memory`) and makes its sockets in a short folder (`socket_temp_dir`)."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # not Linux: torch's worker watchdog ends an idle worker
            pass
        if self.nice:
            os.nice(self.nice)
        _close_inherited_files()
        keep_freed_memory()
        if self.socket_dir is not None:  # multiprocessing's folder made afresh there (and removed at the worker's exit)
            tempfile.tempdir = self.socket_dir
            mp.current_process()._config.pop("tempdir", None)  # type: ignore[attr-defined]
        self.busy[worker_id] = -1
        self.pids[worker_id] = os.getpid()


@dataclass
class _Entry:
    """An item in the window: its sample, its number in the run (`seq`), its record once back, and how many decode
    workers died while it was theirs."""

    item: Any
    sample: Sample | dict
    seq: int
    rec: Decoded | None = None
    deaths: int = 0


class DecodeLoader:
    """Decodes samples in `workers` processes of a torch DataLoader, in input order. The loader's sampler hands
    out the samples themselves, read from the input as the loader asks (streamed inputs are read in the run's
    process), `prefetch` per worker in flight (memory stays flat whatever the input's length; None: two batches
    ahead). The window (`pending`) holds what was handed out and not yet returned, in order, so that when a worker
    dies (killed, out of memory: noticed within POLL_S) the samples in flight are handed to a new loader, the one
    the dead worker was decoding counted (recorded as failed, `WorkerDied`, once DEATHS workers died on it); a
    decode that stalls is recorded after `timeout` seconds (`WorkerTimeout`) and the rest go on with a new loader.
    workers=0 decodes in the calling thread. (Not an IterableDataset splitting units across workers: a unit would
    decode in one worker, a tar's samples one after another, and which samples a dead worker held would be lost.)"""

    def __init__(self, fit: Fit, workers: int, timeout: float = 120.0, prefetch: int | None = None,
                 batch_size: int = 1):
        self.fit, self.workers, self.timeout = fit, workers, timeout
        self.prefetch = prefetch or max(4, math.ceil(2 * batch_size / max(1, workers)))
        self.window = self.prefetch * workers  # samples handed to the loader and not yet returned, at most
        self.restarts = 0  # loaders replaced after a worker died or a decode stalled
        self.pending: deque[_Entry] = deque()
        # the ring holds what is in flight and what the run holds: the batch it fills and the one being computed
        self._data = _Decoding(fit, workers, self.window + 2 * batch_size + 2) if workers > 0 else None
        self._slot_of: dict[int, int] = {}  # seq -> the ring slot its sample was handed out with
        self._it: Any = None
        self._source: Iterator[Any] = iter(())
        self._sample_of: Callable[[Any], Sample | dict] = lambda x: x
        self._seq, self._exhausted, self._failed = 0, False, None
        self._fruitless = 0  # loaders replaced in a row with no record back
        self._sigchld: Any = None

    def map(self, items: Iterable[Any], sample_of: Callable[[Any], Sample | dict]) -> Iterator[tuple[Any, Decoded]]:
        """For each item (anything carrying a sample), yield (item, record) in input order. Items whose sample is
        already a failure record pass through without decoding."""
        if self._data is None:
            for item in items:
                s = sample_of(item)
                yield item, (Decoded.failed(s) if isinstance(s, dict) else decode_sample(s, self.fit))
            return
        self._source, self._sample_of, self._exhausted = iter(items), sample_of, False
        if threading.current_thread() is threading.main_thread():
            self._sigchld = signal.getsignal(signal.SIGCHLD)
        self._start([])
        pending = self.pending
        while True:
            while pending and pending[0].rec is not None:
                e = pending.popleft()
                yield e.item, e.rec
            if not pending and self._exhausted:
                self._end(kill=False)
                return
            self._receive()

    def _read(self, redo: list[_Entry]) -> Iterator[tuple[int, Sample | dict, int]]:
        """The loader's sampler: first the samples a loader before it held and did not return, then the input's,
        each added to the window as it is handed out. Items that pass through go into the window with their record;
        one of a long run of them goes through the loader, so that the run takes the others out of the window."""
        for e in redo:
            yield e.seq, e.sample, self._slot(e.seq)
        passed = 0
        while True:
            try:
                item = next(self._source)
            except StopIteration:
                self._exhausted = True
                return
            except BaseException as err:  # the input's own error: the run's to raise, not the loader's
                self._failed = err
                raise
            s = self._sample_of(item)
            self._seq += 1
            e = _Entry(item, s, self._seq)
            self.pending.append(e)
            if isinstance(s, dict) and passed < self.window:
                e.rec, passed = Decoded.failed(s), passed + 1
                continue
            passed = 0
            yield e.seq, s, self._slot(e.seq)

    def _slot(self, seq: int) -> int:
        """A ring slot for the sample `seq` is handed out with (-1: none, its pixels come as a tensor)."""
        ring = self._data.ring  # type: ignore[union-attr]
        slot = ring.take() if ring is not None else -1
        if slot >= 0:
            self._slot_of[seq] = slot
        return slot

    def _release_slots(self) -> None:
        """The slots of samples handed to a loader whose workers are gone (they returned nothing into them)."""
        for slot in self._slot_of.values():
            self._data.ring.release(slot)  # type: ignore[union-attr]
        self._slot_of.clear()

    def _start(self, redo: list[_Entry]) -> None:
        """A new loader over `redo`, then the rest of the input; its workers fork now."""
        data = self._data
        for w in range(self.workers):
            data.busy[w], data.pids[w] = -1, 0  # type: ignore[union-attr]
        # results come back in the order handed out (DataLoader's default, `in_order`, torch >= 2.6; always before)
        loader = DataLoader(data, batch_size=None, sampler=_Sampler(self, redo), num_workers=self.workers,  # type: ignore[arg-type]
                            collate_fn=_as_is, prefetch_factor=self.prefetch, timeout=POLL_S,
                            worker_init_fn=data.init_worker, multiprocessing_context="fork")  # type: ignore[union-attr]
        self._it = iter(loader)
        # torch's SIGCHLD handler (installed by the first loader of a process) raises a worker's death wherever the
        # main thread is (writing a shard, in the forward): deaths are noticed here, in `_receive`, instead
        if self._sigchld is not None:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)

    def _receive(self) -> None:
        """Wait for the record of the first sample in flight (the window's first entry): it comes back, or its
        worker died, or it stalled past the timeout; or the loader has nothing left for it."""
        front = self.pending[0] if self.pending else None
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                seq, rec, shape = next(self._it)
            except StopIteration:  # it ended with samples in flight: its workers are gone
                self._restart()
                return
            except Exception as err:  # the loader's POLL_S wait ended, or a worker died (RuntimeError; or EOFError,
                # OSError: the handle of a record it sent points at its memory, gone with it)
                if self._failed is not None:
                    raise
                dead = [w for w in range(self.workers) if self._data.pids[w] and _exited(self._data.pids[w])]  # type: ignore[union-attr]
                if dead:
                    self._died(dead)
                elif front is not None and time.monotonic() >= deadline:
                    self._stalled(front)
                elif isinstance(err, RuntimeError) and str(err).startswith("DataLoader timed out"):
                    continue  # nothing yet
                else:  # a worker gone (before it said its pid, or not yet reaped), or the loader broken
                    self._restart(err)
                return
            if front is None or seq != front.seq:  # not what is waited for: the loader skipped a sample
                self._restart()
                return
            slot, ring = self._slot_of.pop(seq, -1), self._data.ring  # type: ignore[union-attr]
            rec = _from_shared(rec)
            if shape is not None:
                rec.pixels = ring.view(slot, shape)
            elif slot >= 0:  # handed a slot it did not use (a failure, pixels of another size)
                ring.release(slot)
            front.rec, self._fruitless = rec, 0
            return

    def _died(self, dead: list[int]) -> None:
        """Workers died: the sample each was decoding counts a death (recorded once it has DEATHS); every sample in
        flight goes to a new loader."""
        held = {self._data.busy[w] for w in dead} - {-1}  # type: ignore[union-attr]
        for e in self.pending:
            if e.rec is None and e.seq in held:
                e.deaths += 1
                if e.deaths >= DEATHS:
                    self._fail(e, "the decode worker died three times while this sample was in flight (killed, or "
                                  "out of memory?)", "WorkerDied")
        self._restart()

    def _stalled(self, front: _Entry) -> None:
        """The first sample in flight has not come back within the timeout: recorded; its worker is stopped with the
        loader and the samples after it go to a new one."""
        self._fail(front, f"no result after {self.timeout:g}s (the decode worker stalled or died)", "WorkerTimeout")
        self._restart()

    def _fail(self, e: _Entry, why: str, error_class: str) -> None:
        """The entry's record: its sample failed in the decode stage (one that passes through keeps its own)."""
        s = e.sample
        e.rec = Decoded.failed(s if isinstance(s, dict) else failure(s, "decode", why, error_class))
        self._fruitless = 0

    def _restart(self, why: BaseException | None = None) -> None:
        """Replace the loader: its workers are ended; what it held and did not return is handed to a new one, in
        order. Loaders that keep ending with no record back (workers that die as they start) stop the run."""
        self._fruitless += 1
        if self._fruitless > 2 * DEATHS:
            raise S2Error(f"the decode workers ended {self._fruitless} times in a row with no image decoded",
                          given=f"-j {self.workers}", fix="pass -j 0 to decode in the main process; see the "
                          "workers' own messages above") from why
        self.restarts += 1
        self._end(kill=True, restore=False)
        self._start([e for e in self.pending if e.rec is None])

    def _end(self, kill: bool, restore: bool = True) -> None:
        """Shut the loader down (its workers ended at once with `kill`: one may hang in a read, or hold its result
        queue's lock, and the shutdown would wait for each in turn); with `restore`, SIGCHLD's handler as it was."""
        it, self._it = self._it, None
        if it is not None:
            for w in range(self.workers if kill else 0):
                pid = self._data.pids[w]  # type: ignore[union-attr]
                if pid and not _exited(pid):  # a child not yet reaped: its pid cannot be another process's
                    os.kill(pid, signal.SIGKILL)
            it._shutdown_workers()  # what its __del__ does, done now
            self._release_slots()  # (its workers are gone: none writes into a slot any more)
        if restore and self._sigchld is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGCHLD, self._sigchld)  # (closed from another thread: it stays SIG_DFL)
            self._sigchld = None

    def close(self) -> None:
        """Stop the workers, whatever they are doing, within seconds."""
        self._end(kill=True)

    def __enter__(self) -> "DecodeLoader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Sampler:
    """The loader's sampler: an iterable that `DataLoader` iterates once (the run's `_read`)."""

    def __init__(self, stage: DecodeLoader, redo: list[_Entry]):
        self.stage, self.redo = stage, redo

    def __iter__(self) -> Iterator[tuple[int, Sample | dict, int]]:
        return self.stage._read(self.redo)
