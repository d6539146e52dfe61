"""Sinks: write features to HDF5 from a writer thread (the compute loop never waits on disk), atomically:
the file appears under its final name only when complete. And read them back: `open_features`."""
from __future__ import annotations

import json
import os
import queue
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from .errors import ConfigError, S2Error

STR = h5py.string_dtype("utf-8")
LAYOUT_VERSION = 1


class HDF5Sink:
    """Appends images to `path` (via a temporary file beside it) and renames it into place on `close()`.

    Layout (LAYOUT_VERSION 1):
      attrs      s2cli_version, model, weights, layer, scales, img_sizes, max_split_size, split_mode,
                 num_prefix_tokens, output_shape, merge, fit, dtype, config (resolved, JSON), num_images, num_failed
      keys       (N,) str          image keys, in input order
      features   (N, T, C)         when every image has the same token count T (one image per chunk), or
                 (sum T_i, C)      flat, with `offsets` (N+1,) int64, when token counts differ (fit=keep)
      source (N,) str, orig_hw (N, 2), grid_hw (N, 2), img_sizes (N, S, 2), num_prefix_tokens (N,), split_mode (N,)
      failures   (M,) str          one JSON record per failed image: key, source, stage, error_class, error
    """

    def __init__(self, path: str | os.PathLike, attrs: dict[str, Any], channels: int, num_scales: int,
                 tokens: int | None, dtype: str, queue_size: int = 4):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_file():
            raise ConfigError("output path exists and is not a file", given=str(self.path), fix="choose another -o path")
        if not self.path.parent.exists():
            raise ConfigError("output folder does not exist", given=str(self.path.parent), fix="create it first")
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.ragged = tokens is None
        self.dtype = np.dtype(dtype)
        self.f = h5py.File(self.tmp, "w")
        for k, v in attrs.items():
            self.f.attrs[k] = v
        self.f.attrs["layout_version"] = LAYOUT_VERSION
        f = self.f
        f.create_dataset("keys", (0,), STR, maxshape=(None,), chunks=(1024,))
        f.create_dataset("source", (0,), STR, maxshape=(None,), chunks=(1024,))
        if self.ragged:
            f.create_dataset("features", (0, channels), self.dtype, maxshape=(None, channels), chunks=(256, channels))
            f.create_dataset("offsets", (1,), np.int64, maxshape=(None,), chunks=(1024,), data=[0])
        else:
            f.create_dataset("features", (0, tokens, channels), self.dtype, maxshape=(None, tokens, channels),
                             chunks=(1, tokens, channels))
        f.create_dataset("orig_hw", (0, 2), np.int32, maxshape=(None, 2), chunks=(1024, 2))
        f.create_dataset("grid_hw", (0, 2), np.int32, maxshape=(None, 2), chunks=(1024, 2))
        f.create_dataset("img_sizes", (0, num_scales, 2), np.int32, maxshape=(None, num_scales, 2), chunks=(1024, num_scales, 2))
        f.create_dataset("num_prefix_tokens", (0,), np.int16, maxshape=(None,), chunks=(1024,))
        f.create_dataset("split_mode", (0,), STR, maxshape=(None,), chunks=(1024,))
        self.failures: list[dict[str, str]] = []
        self.n = 0
        self._q: queue.Queue = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="s2cli-writer", daemon=True)
        self._thread.start()

    # -- producer side -----------------------------------------------------------------------------------------
    def write(self, items: list[dict[str, Any]]) -> None:
        """Queue images: dicts with key, source, orig_hw, grid_hw, img_sizes, num_prefix_tokens, split_mode,
        features (T, C) numpy. Blocks only when `queue_size` batches are already waiting."""
        self._raise_if_failed()
        self._q.put(items)

    def fail(self, record: dict[str, str]) -> None:
        self.failures.append(record)

    def close(self) -> Path:
        """Flush, record failures, fsync and rename into place. Returns the final path."""
        self._q.put(None)
        self._thread.join()
        self._raise_if_failed()
        self.f.create_dataset("failures", data=np.array([json.dumps(r) for r in self.failures], dtype=object), dtype=STR)
        self.f.attrs["num_images"] = self.n
        self.f.attrs["num_failed"] = len(self.failures)
        self.f.flush()
        self.f.close()
        with open(self.tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop everything: the final path is never created."""
        try:
            self._q.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout=5)
        try:
            self.f.close()
        finally:
            self.tmp.unlink(missing_ok=True)

    # -- writer thread -----------------------------------------------------------------------------------------
    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise S2Error(f"writing {self.path} failed: {type(self._error).__name__}: {self._error}",
                          fix="check free space and permissions of the output folder") from self._error

    def _run(self) -> None:
        while True:
            items = self._q.get()
            if items is None:
                return
            if self._error is None:
                try:
                    self._append(items)
                except BaseException as e:  # surfaced to the producer on its next call
                    self._error = e

    def _append(self, items: list[dict[str, Any]]) -> None:
        f, n, m = self.f, self.n, len(items)

        def grow(name: str, values: Any) -> None:
            ds = f[name]
            ds.resize(n + m, axis=0)
            ds[n:n + m] = values

        grow("keys", [it["key"] for it in items])
        grow("source", [it["source"] for it in items])
        grow("orig_hw", np.array([it["orig_hw"] for it in items], np.int32))
        grow("grid_hw", np.array([it["grid_hw"] for it in items], np.int32))
        grow("img_sizes", np.array([it["img_sizes"] for it in items], np.int32))
        grow("num_prefix_tokens", np.array([it["num_prefix_tokens"] for it in items], np.int16))
        grow("split_mode", [it["split_mode"] for it in items])
        feats = [np.asarray(it["features"], dtype=self.dtype) for it in items]
        if self.ragged:
            off = f["offsets"]
            start = int(off[n])
            lens = np.cumsum([x.shape[0] for x in feats]) + start
            ds = f["features"]
            ds.resize(int(lens[-1]), axis=0)
            ds[start:int(lens[-1])] = np.concatenate(feats, axis=0)
            off.resize(n + m + 1, axis=0)
            off[n + 1:n + m + 1] = lens
        else:
            grow("features", np.stack(feats))
        self.n = n + m


def _attr(v: Any) -> Any:
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, np.ndarray):
        v = v.tolist()
    return v


class FeatureFile(Mapping):
    """Lazy read-back: key -> features (T, C) numpy array; `.meta(key)`; `.attrs`; `.failures`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError("no such feature file", given=str(path), fix="pass a .h5 written by `s2 extract`")
        try:
            self.f = h5py.File(self.path, "r")
        except OSError as e:
            raise ConfigError("not an HDF5 file", given=str(path), fix="pass a .h5 written by `s2 extract`") from e
        if "keys" not in self.f or "features" not in self.f:
            self.f.close()
            raise ConfigError("not an s2cli feature file (no keys/features datasets)", given=str(path),
                              fix="pass a .h5 written by `s2 extract`")
        self._keys = [k.decode() if isinstance(k, bytes) else k for k in self.f["keys"][:]]
        self._index = {k: i for i, k in enumerate(self._keys)}
        self.ragged = "offsets" in self.f
        self._offsets = self.f["offsets"][:] if self.ragged else None

    @property
    def attrs(self) -> dict[str, Any]:
        return {k: _attr(v) for k, v in self.f.attrs.items()}

    @property
    def config(self) -> dict[str, Any]:
        return json.loads(self.attrs.get("config", "{}"))

    @property
    def failures(self) -> list[dict[str, str]]:
        if "failures" not in self.f:
            return []
        return [json.loads(_attr(r)) for r in self.f["failures"][:]]

    def _i(self, key: str) -> int:
        try:
            return self._index[key]
        except KeyError:
            raise KeyError(f"no image with key {key!r} in {self.path} ({len(self)} keys; see `s2 inspect`)") from None

    def __getitem__(self, key: str) -> np.ndarray:
        i = self._i(key)
        if self.ragged:
            return self.f["features"][int(self._offsets[i]):int(self._offsets[i + 1])]
        return self.f["features"][i]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def meta(self, key: str) -> dict[str, Any]:
        i = self._i(key)
        f = self.f
        return {
            "key": key, "source": _attr(f["source"][i]), "orig_hw": f["orig_hw"][i].tolist(),
            "grid_hw": f["grid_hw"][i].tolist(), "img_sizes": f["img_sizes"][i].tolist(),
            "num_prefix_tokens": int(f["num_prefix_tokens"][i]), "split_mode": _attr(f["split_mode"][i]),
        }

    @property
    def feature_shape(self) -> list[int | None]:
        ds = self.f["features"]
        return [None, ds.shape[1]] if self.ragged else list(ds.shape[1:])

    @property
    def dtype(self) -> str:
        return str(self.f["features"].dtype)

    def close(self) -> None:
        self.f.close()

    def __enter__(self) -> "FeatureFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_features(path: str | os.PathLike) -> FeatureFile:
    """Open a feature file written by `s2 extract` for lazy reading by key."""
    return FeatureFile(path)
