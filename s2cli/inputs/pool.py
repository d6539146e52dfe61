"""The decode pool: samples decoded in worker processes, in order, a bounded window in flight, a stalled or dead
worker's sample recorded after a timeout."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import stat
import sys
import threading
import time
from collections import deque
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from ..errors import ConfigError
from .decode import Decoded, Fit, decode_sample
from .samples import Sample, failure

DECODE_NICE = 10  # niceness added to decode workers (S2CLI_DECODE_NICE overrides); chosen by benchmarks/bench_overlap.py


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


def _worker_init(nice: int = 0) -> None:
    # Ctrl-C reaches the whole process group: only the parent acts on it (a worker killed by it could die holding
    # the pool's queue lock, and the parent's pool shutdown would wait for that lock forever); SIGTERM (the pool's
    # own shutdown) ends a worker at once, whatever handler the parent had when it forked
    # SIGUSR1 (SLURM's warning before the time limit, sent to every process of a step) is the parent's to act on:
    # it stops the pool; a worker that inherited the parent's handler would print a traceback instead
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass
    if nice:
        os.nice(nice)
    _close_inherited_files()


def _close_inherited_files() -> None:
    """Close the regular files a worker inherited from the run (an output shard being written): a worker holding
    one keeps its HDF5 file lock alive after the run closed it, and the run could not read the shard back. A pool
    forked again mid-run (after a worker died) inherits the shard in flight. Pipes, sockets and stdio stay."""
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


_STARTED: Any = None  # which worker (pid) took each task slot: set by the pool before it forks


def _decode_job(args: tuple[Sample, Fit, bool, int]) -> Decoded:
    sample, fit, shared, slot = args
    if _STARTED is not None:
        _STARTED[slot] = os.getpid()
    rec = decode_sample(sample, fit)
    return _to_shared(rec) if shared else rec


def _to_shared(rec: Decoded) -> Decoded:
    """In the worker: the record's arrays as torch tensors, which torch's reductions move into shared memory
    (only a handle is pickled through the pipe)."""
    import torch

    return rec.map_arrays(lambda a: torch.from_numpy(a) if isinstance(a, np.ndarray) else a)


def _from_shared(rec: Decoded) -> Decoded:
    """In the parent: the shared tensors viewed as numpy arrays again (no copy)."""
    return rec.map_arrays(lambda a: a.numpy() if hasattr(a, "numpy") else a)


def shared_memory_available() -> bool:
    """Pixels go through shared memory when torch is already imported (a run; never imported for this alone)
    and S2CLI_DECODE_SHM is not 0 (benchmarks compare the two)."""
    if os.environ.get("S2CLI_DECODE_SHM", "1") == "0" or "torch" not in sys.modules:
        return False
    import torch.multiprocessing  # noqa: F401  (registers the reductions that put tensors in shared memory)

    return True


class DecodePool:
    """Decodes samples in `workers` processes, in order, with at most `window` in flight (memory stays flat
    whatever the input's length). A worker that dies (killed, out of memory) is noticed within POLL_S: the pool is
    replaced by a new one and the samples not yet decoded are submitted again (a sample in flight on a worker that died three times is
    recorded as failed, `WorkerDied`: it is likely what kills them). A sample whose decode stalls is recorded after
    `timeout` seconds instead of being waited on forever. workers=0 decodes in the calling thread."""

    POLL_S = 0.25

    def __init__(self, fit: Fit, workers: int, timeout: float = 120.0, window: int | None = None):
        self.fit, self.workers, self.timeout = fit, workers, timeout
        self.window = window or max(4, 4 * workers)
        self.nice = decode_nice()
        self.restarts = 0  # pools replaced after a worker died
        self.shared = shared_memory_available()  # decoded pixels come back through shared memory
        self._pending: deque = deque()  # [item, sample, job, deaths seen while in flight, task slot]
        self.slots, self._seq = 2 * self.window + 2, 0  # more slots than tasks in flight: a slot is not reused early
        self._pool = self._new_pool() if workers > 0 else None

    def _new_pool(self) -> Any:
        global _STARTED
        if _STARTED is None or len(_STARTED) < self.slots:
            _STARTED = mp.get_context("fork").RawArray("q", self.slots)
        pool = mp.get_context("fork").Pool(self.workers, initializer=_worker_init, initargs=(self.nice,))
        self._procs = list(pool._pool)  # type: ignore[attr-defined]
        return pool

    def map(self, items: Iterable[Any], sample_of: Callable[[Any], Sample | dict]) -> Iterator[tuple[Any, Decoded]]:
        """For each item (anything carrying a sample), yield (item, record) in input order. Items whose sample is
        already a failure record pass through without decoding."""
        if self._pool is None:
            for item in items:
                s = sample_of(item)
                yield item, (Decoded.failed(s) if isinstance(s, dict) else decode_sample(s, self.fit))
            return
        pending = self._pending
        for item in items:
            s = sample_of(item)
            self._seq += 1
            slot = self._seq % self.slots
            pending.append([item, s, None if isinstance(s, dict) else self._submit(s, slot), 0, slot])
            if len(pending) >= self.window:
                yield self._get()
        while pending:
            yield self._get()

    def _submit(self, s: Sample, slot: int) -> Any:
        _STARTED[slot] = 0
        return self._pool.apply_async(_decode_job, ((s, self.fit, self.shared, slot),))  # type: ignore[union-attr]

    def _get(self) -> tuple[Any, Decoded]:
        entry = self._pending[0]
        item, s = entry[0], entry[1]
        if entry[2] is None:
            self._pending.popleft()
            return item, Decoded.failed(s)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                rec = entry[2].get(timeout=self.POLL_S)
                self._pending.popleft()
                return item, _from_shared(rec) if self.shared else rec
            except mp.TimeoutError:
                pass
            if entry[3] >= 3:  # in flight on a worker that died, three times
                self._pending.popleft()
                return item, Decoded.failed(failure(s, "decode", "the decode worker died three times while this "
                                                    "sample was in flight (killed, or out of memory?)", "WorkerDied"))
            if any(p.exitcode is not None for p in self._procs):
                self._restart()
                deadline = time.monotonic() + self.timeout
            elif time.monotonic() >= deadline:
                self._pending.popleft()
                err = failure(s, "decode", f"no result after {self.timeout:.0f}s (the decode worker stalled or died)",
                              "WorkerTimeout")
                return item, Decoded.failed(err)

    def _restart(self) -> None:
        """A worker died: its task is lost, and it may have died holding the pool's queue lock (then no worker
        gets a task again). The pool is replaced; every sample not yet decoded is submitted to the new one."""
        self.restarts += 1
        time.sleep(self.POLL_S)  # results sent before the death reach their jobs (the pool's result thread)
        old = [(e, e[2].get(0) if e[2] is not None and e[2].ready() else None) for e in self._pending]
        dead = {p.pid for p in self._procs if p.exitcode is not None}
        # a worker runs its tasks one after another: of the undecoded samples it took, only the last one it took
        # was in flight when it died (a slot keeps the pid of a task that finished, whose result may still be in
        # transit: that one is submitted again, not counted as a death)
        last: dict[int, int] = {}
        for e, rec in old:
            if rec is None and _STARTED[e[4]] in dead:
                last[_STARTED[e[4]]] = e[4]
        in_flight = set(last.values())
        self.close(deadline=2.0)
        self._pool = self._new_pool()
        for e, rec in old:
            if e[2] is None:
                continue
            if rec is not None:  # decoded before the death: kept
                e[2] = _Done(rec)
            else:
                e[3] += e[4] in in_flight
                e[2] = self._submit(e[1], e[4])

    def close(self, deadline: float = 10.0) -> None:
        """Stop the workers, within `deadline` seconds whatever they are doing: the pool's own shutdown waits for
        its queue lock, which a worker that died (killed, out of memory) may hold forever, so it runs aside and,
        past the deadline, the workers are killed and it is left behind."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        workers = list(getattr(pool, "_pool", ()))
        stop = threading.Thread(target=_stop, args=(pool,), name="s2cli-decode-close", daemon=True)
        stop.start()
        stop.join(deadline)
        if stop.is_alive():
            for w in workers + list(getattr(pool, "_pool", ())):
                if w.exitcode is None:
                    w.kill()
            stop.join(1.0)

    def __enter__(self) -> "DecodePool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _stop(pool: Any) -> None:
    """terminate + join; a pool replaced after a worker died may still list that worker's task, and
    multiprocessing's own shutdown then asserts (its result thread gone): the workers are ended either way."""
    try:
        pool.terminate()
        pool.join()
    except (AssertionError, OSError, ValueError):
        pass


class _Done:
    """A result already in hand, read as a pending job's (`get`)."""

    def __init__(self, rec: Decoded):
        self.rec = rec

    def get(self, timeout: float | None = None) -> Decoded:
        return self.rec

    def ready(self) -> bool:
        return True
