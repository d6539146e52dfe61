"""Writers: features into one HDF5 or safetensors file from a writer thread (the compute loop never waits on
disk), atomically (the file appears under its final name only when complete). Also the formats and their
file suffixes, and the bytes a stored element takes."""
from __future__ import annotations

import errno
import json
import os
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np

from .errors import ConfigError, S2Error
from .fsutil import fsync_rename, human_bytes, pid_alive, write_error

STR = h5py.string_dtype("utf-8")
LAYOUT_VERSION = 1
FORMATS = {"h5": ".h5", "safetensors": ".safetensors"}
POOLED_TENSOR = "__s2cli_pooled__"


BF16 = "bfloat16"
# bfloat16 has no numpy dtype: HDF5 stores its bits as uint16 with the dataset attribute encoding="bfloat16"
# (the upper half of the float32, rounded to nearest even, as torch's .to(torch.bfloat16)); safetensors stores BF16
ENCODING_ATTR = "encoding"
SAFETENSORS_HEADER_LIMIT = 100_000_000  # bytes: safetensors refuses to read (and write) a larger JSON header
HDF5_CHUNK_BYTES = 1 << 16  # target chunk size of the per-row datasets (pooled, ragged features)
META_ROWS = 256  # rows per chunk of the small per-image datasets (keys, sizes, ...)


def itemsize(dtype: str) -> int:
    """Bytes one stored element takes for a stored dtype (float32, float16 or bfloat16)."""
    return 2 if dtype == BF16 else np.dtype(dtype).itemsize


def to_bf16_bits(x: Any) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounded to nearest even (finite values)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def from_bf16_bits(b: Any) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32, exactly."""
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def encode(x: Any, dtype: str) -> np.ndarray:
    """Features as stored: the numpy array of the stored dtype (bfloat16: its bits as uint16)."""
    return to_bf16_bits(x) if dtype == BF16 else np.ascontiguousarray(np.asarray(x, dtype=dtype))


def _rows(row_bytes: int, cap: int = 1024) -> int:
    """Rows per chunk so that a chunk stays near HDF5_CHUNK_BYTES (a file of 8 vectors is not a MB-sized chunk)."""
    return max(1, min(cap, HDF5_CHUNK_BYTES // max(1, row_bytes)))


def check_output_file(path: Path, overwrite: bool = True) -> None:
    """Refuse a single-file output that cannot be written: something other than a file under its name, a file
    already there (unless `overwrite`), or no folder to put it in."""
    if path.exists() and not path.is_file():
        raise ConfigError("output path exists and is not a file", given=str(path), fix="choose another -o path")
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
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def _nbytes(items: list[dict[str, Any]]) -> int:
    return sum(getattr(it.get(k), "nbytes", 0) for it in items for k in ("features", "pooled"))


class ThreadedSink:
    """The writer thread and the atomic commit shared by every format. Subclasses implement `_open`,
    `_append(items)` and `_finish(failures)`."""

    suffix = ""
    need_bytes: int | None = None  # what a complete shard will take, for the message when the disk is full
    guard = False  # True: the final rename replaces only `replaces` (see fsutil.fsync_rename), never a newcomer
    replaces: tuple[int, int, int] | None = None

    def __init__(self, path: str | os.PathLike, attrs: dict[str, Any], queue_size: int = 4):
        self.path = Path(path)
        check_output_file(self.path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.attrs = attrs
        self.failures: list[dict[str, str]] = []
        self.keys: list[str] = []
        self.n = 0
        self.busy_s = 0.0  # seconds the writer thread spent writing (the run's "write" stage)
        self._q: queue.Queue = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self._end_error: BaseException | None = None  # what failed in `_end` (raised by `wait`)
        self._then: Callable[[Path], None] | None = None
        self._aborted = False
        self._open()
        self._thread = threading.Thread(target=self._run, name="s2cli-writer", daemon=True)
        self._thread.start()

    def write(self, items: list[dict[str, Any]]) -> None:
        """Queue images: dicts with key, source, meta, orig_hw, grid_hw, img_sizes, num_prefix_tokens,
        split_mode, features (T, C) or None, pooled (C,) or None. Blocks only when the queue is full."""
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
            self.tmp.unlink(missing_ok=True)
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
            self.tmp.unlink(missing_ok=True)
            # an S2Error already says what went wrong (a safetensors header over its limit)
            self._end_error = e if isinstance(e, S2Error) else write_error(self.path, e, self.need_bytes)
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
            self.tmp.unlink(missing_ok=True)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise write_error(self.path, self._error, self.need_bytes) from self._error

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
                    self._reserve(_nbytes(items))
                    self._append(items)
                    self.keys.extend(it["key"] for it in items)
                    self.n += len(items)
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
    def _append(self, items: list[dict[str, Any]]) -> None: ...
    def _finish(self) -> None: ...
    def _discard(self) -> None: ...


class HDF5Sink(ThreadedSink):
    """HDF5 layout (LAYOUT_VERSION 1):
      attrs      s2cli_version, model, weights, layer, scales, img_sizes, max_split_size, split_mode,
                 num_prefix_tokens, output_shape, merge, fit, dtype, pool, config (resolved, JSON), num_images, num_failed
      keys       (N,) str          image keys, in input order
      features   (N, T, C)         when every image has the same token count T (one image per chunk), or
                 (sum T_i, C)      flat, with `offsets` (N+1,) int64, when token counts differ (fit=keep);
                                   absent with --pool-only
      pooled     (N, C)            with --pool mean|cls
      source (N,) str, meta (N,) str (JSON or ""), orig_hw (N, 2), grid_hw (N, 2), img_sizes (N, S, 2),
      num_prefix_tokens (N,), split_mode (N,) str
      plan       (N,) str          with `plans` (a dynamic-resolution strategy): each image's plan and output maps (JSON)
      frames     (N,) int32        with video input (flat layout): an entry's frame count (its rows are F x T,
                                   read back as (F, T, C)); 0 for an image
      reduce     (N,) str          with --reduce: each image's reduction, JSON {"op": "s2c:2", "grid_before": [h, w],
                                   "grid_hw": [h', w']} (grid_hw holds the grid after it)
      features/pooled with --dtype bfloat16: uint16 bits, dataset attribute encoding="bfloat16"
      failures   (M,) str          one JSON record per failed image: key, source, stage, error_class, error
    """

    suffix = ".h5"

    def __init__(self, path, attrs, channels: int, num_scales: int, tokens: int | None, dtype: str,
                 store_features: bool = True, pooled: bool = False, plans: bool = False, queue_size: int = 4,
                 pooled_channels: int | None = None, reduced: bool = False, videos: bool = False):
        self.videos = videos
        self.channels, self.num_scales, self.tokens, self.plans = channels, num_scales, tokens, plans
        self.pooled_channels, self.reduced = pooled_channels or channels, reduced
        self.stored, self.store_features, self.pooled = dtype, store_features, pooled
        self.dtype = np.dtype(np.uint16) if dtype == BF16 else np.dtype(dtype)
        super().__init__(path, attrs, queue_size)

    def _open(self) -> None:
        f = self.f = h5py.File(self.tmp, "w")
        for k, v in self.attrs.items():
            f.attrs[k] = v
        f.attrs["layout_version"] = LAYOUT_VERSION
        C, S = self.channels, self.num_scales
        R, row = META_ROWS, C * self.dtype.itemsize
        for name in ("keys", "source", "meta", "split_mode") + (("plan",) if self.plans else ()) + (("reduce",) if self.reduced else ()):
            f.create_dataset(name, (0,), STR, maxshape=(None,), chunks=(R,))
        if self.store_features:
            if self.tokens is None:
                f.create_dataset("features", (0, C), self.dtype, maxshape=(None, C), chunks=(_rows(row, 256), C))
                f.create_dataset("offsets", (1,), np.int64, maxshape=(None,), chunks=(R,), data=[0])
            else:
                f.create_dataset("features", (0, self.tokens, C), self.dtype, maxshape=(None, self.tokens, C),
                                 chunks=(1, self.tokens, C))
        if self.pooled:
            P = self.pooled_channels
            f.create_dataset("pooled", (0, P), self.dtype, maxshape=(None, P), chunks=(_rows(P * self.dtype.itemsize), P))
        for name in ("features", "pooled"):
            if name in f and self.stored == BF16:
                f[name].attrs[ENCODING_ATTR] = BF16
        f.create_dataset("orig_hw", (0, 2), np.int32, maxshape=(None, 2), chunks=(R, 2))
        f.create_dataset("grid_hw", (0, 2), np.int32, maxshape=(None, 2), chunks=(R, 2))
        f.create_dataset("img_sizes", (0, S, 2), np.int32, maxshape=(None, S, 2), chunks=(R, S, 2))
        f.create_dataset("num_prefix_tokens", (0,), np.int16, maxshape=(None,), chunks=(R,))
        if self.videos:
            f.create_dataset("frames", (0,), np.int32, maxshape=(None,), chunks=(R,))

    def _append(self, items: list[dict[str, Any]]) -> None:
        f, n, m = self.f, self.n, len(items)

        def grow(name: str, values: Any) -> None:
            ds = f[name]
            ds.resize(n + m, axis=0)
            ds[n:n + m] = values

        grow("keys", [it["key"] for it in items])
        grow("source", [it["source"] for it in items])
        grow("meta", [it.get("meta") or "" for it in items])
        grow("split_mode", [it["split_mode"] for it in items])
        for name in ("plan", "reduce"):
            if name in f:
                grow(name, [it.get(name) or "" for it in items])
        grow("orig_hw", np.array([it["orig_hw"] for it in items], np.int32))
        grow("grid_hw", np.array([it["grid_hw"] for it in items], np.int32))
        grow("img_sizes", np.array([it["img_sizes"] for it in items], np.int32))
        grow("num_prefix_tokens", np.array([it["num_prefix_tokens"] for it in items], np.int16))
        if self.videos:
            grow("frames", np.array([_frames(it) for it in items], np.int32))
        if self.pooled:
            grow("pooled", np.stack([encode(it["pooled"], self.stored) for it in items]))
        if not self.store_features:
            return
        feats = [encode(it["features"], self.stored) for it in items]
        feats = [x.reshape(-1, x.shape[-1]) for x in feats]  # a video's (F, T, C) as F x T rows
        if self.tokens is None:
            off = f["offsets"]
            start = int(off[n])
            ends = np.cumsum([x.shape[0] for x in feats]) + start
            ds = f["features"]
            ds.resize(int(ends[-1]), axis=0)
            ds[start:int(ends[-1])] = np.concatenate(feats, axis=0)
            off.resize(n + m + 1, axis=0)
            off[n + 1:n + m + 1] = ends
        else:
            grow("features", np.stack(feats))

    def _finish(self) -> None:
        self.f.create_dataset("failures", data=np.array([json.dumps(r) for r in self.failures], dtype=object), dtype=STR)
        self.f.attrs["num_images"] = self.n
        self.f.attrs["num_failed"] = len(self.failures)
        self.f.close()

    def _discard(self) -> None:
        # Empty the file first: on a full disk HDF5 cannot flush on close, and an h5py file left half-closed
        # crashes the interpreter when it is collected. Emptied, the close succeeds; the file is removed next.
        try:
            os.truncate(self.tmp, 0)
        except OSError:
            pass
        try:
            self.f.close()
        except Exception:
            pass


class SafetensorsSink(ThreadedSink):
    """safetensors layout: one tensor per image named by its key, (T, C) (absent with --pool-only); with
    --pool, one tensor `__s2cli_pooled__` (N, C) in the order of the `keys` list. Header metadata (strings):
    `s2cli` (the file attributes, as in HDF5, JSON), `keys` (JSON list, input order), `images` (JSON: key ->
    source, meta, orig_hw, grid_hw, img_sizes, num_prefix_tokens, split_mode), `failures` (JSON list).
    A shard is held in memory until it is written (size shards with --shard-size)."""

    suffix = ".safetensors"

    def __init__(self, path, attrs, channels: int, num_scales: int, tokens: int | None, dtype: str,
                 store_features: bool = True, pooled: bool = False, plans: bool = False, queue_size: int = 4,
                 pooled_channels: int | None = None, reduced: bool = False, videos: bool = False):
        # `plans`: images carry their plan (JSON), stored in their header entry (whenever an item has one)
        self.stored, self.store_features, self.pooled = dtype, store_features, pooled
        super().__init__(path, attrs, queue_size)

    def _open(self) -> None:
        self.tensors: dict[str, np.ndarray] = {}
        self.pooled_rows: list[np.ndarray] = []
        self.images: dict[str, dict[str, Any]] = {}

    def _append(self, items: list[dict[str, Any]]) -> None:
        for it in items:
            k = it["key"]
            if k in self.images or k == POOLED_TENSOR:
                raise S2Error(f"key {k!r} appears twice in one safetensors shard", fix="make keys unique")
            if self.store_features:
                self.tensors[k] = encode(it["features"], self.stored)
            if self.pooled:
                self.pooled_rows.append(encode(it["pooled"], self.stored))
            self.images[k] = {"source": it["source"], "meta": it.get("meta"), "orig_hw": list(it["orig_hw"]),
                              "grid_hw": list(it["grid_hw"]), "img_sizes": [list(s) for s in it["img_sizes"]],
                              "num_prefix_tokens": int(it["num_prefix_tokens"]), "split_mode": it["split_mode"]}
            for name in ("plan", "reduce"):
                if it.get(name):
                    self.images[k][name] = it[name]
            if _frames(it):
                self.images[k]["frames"] = _frames(it)

    def _finish(self) -> None:
        from safetensors.numpy import save_file

        tensors = dict(self.tensors)
        if self.pooled and self.pooled_rows:
            tensors[POOLED_TENSOR] = np.stack(self.pooled_rows)
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in self.attrs.items()}
        attrs.update(num_images=self.n, num_failed=len(self.failures), layout_version=LAYOUT_VERSION)
        meta = {"s2cli": json.dumps(attrs), "keys": json.dumps(list(self.images)), "images": json.dumps(self.images),
                "failures": json.dumps(self.failures)}
        header = safetensors_header_bytes(tensors, meta)
        if header > SAFETENSORS_HEADER_LIMIT:
            fit = max(1, int(self.n * SAFETENSORS_HEADER_LIMIT / header * 0.9))
            raise S2Error(f"the safetensors header of {self.path.name} would take {header:,} bytes, over the format's "
                          f"limit of {SAFETENSORS_HEADER_LIMIT:,}: {self.n} images and their metadata in one shard",
                          given=f"--shard-size {self.n}", expected=f"about {fit} images per shard or fewer",
                          fix=f"pass --shard-size {fit} (finished shards are kept), or --format h5")
        self._reserve(sum(t.nbytes for t in tensors.values()) + header)
        if self.stored == BF16:
            _save_bf16(tensors, self.tmp, meta)
        else:
            save_file(tensors, str(self.tmp), metadata=meta)

    def _discard(self) -> None:
        self.tensors = {}


def _frames(item: dict[str, Any]) -> int:
    """A video entry's frame count (its features are (F, T, C)); 0 for an image."""
    f = item.get("features")
    return int(f.shape[0]) if f is not None and f.ndim == 3 else 0


def safetensors_header_bytes(tensors: dict[str, np.ndarray], meta: dict[str, str]) -> int:
    """The length of the JSON header safetensors writes for these tensors and metadata (within a few bytes)."""
    entry = sum(len(json.dumps(k)) + len(json.dumps(list(t.shape))) + 70 for k, t in tensors.items())
    return entry + len(json.dumps(meta)) + 20


def _save_bf16(tensors: dict[str, np.ndarray], path: Path, meta: dict[str, str]) -> None:
    """safetensors file of BF16 tensors from their uint16 bits (numpy has no bfloat16 to hand to save_file)."""
    from safetensors import serialize_file

    try:
        from safetensors.numpy import TensorSpec  # safetensors >= 0.6
        flat = {k: TensorSpec(dtype=BF16, shape=t.shape, data_ptr=t.ctypes.data, data_len=t.nbytes) for k, t in tensors.items()}
    except ImportError:
        flat = {k: {"dtype": BF16, "shape": t.shape, "data": t.tobytes()} for k, t in tensors.items()}
    serialize_file(flat, str(path), metadata=meta)


SINKS = {"h5": HDF5Sink, "safetensors": SafetensorsSink}


def format_of(path: str | os.PathLike) -> str | None:
    suffix = Path(path).suffix.lower()
    return next((f for f, s in FORMATS.items() if s == suffix), None)
