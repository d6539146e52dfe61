"""The HDF5 format: its sink (one chunked dataset per array and per-image attribute) and its reader (lazy, by key).

Layout (LAYOUT_VERSION 1):
  attrs      s2cli_version, model, weights, layer, scales, img_sizes, max_split_size, split_mode,
             num_prefix_tokens, output_shape, merge, fit, dtype, pool, config (resolved, JSON), num_images, num_failed
  keys       (N,) str          image keys, in input order
  features   (N, T, C)         when every image has the same token count T (one image per chunk), or
             (sum T_i, C)      flat, with `offsets` (N+1,) int64, when token counts differ (fit=keep) and for
                               videos (an entry's rows are F x T, read back as (F, T, C)); absent with --pool-only
  pooled     (N, C)            with --pool mean|cls
  one dataset per per-image attribute (items.ATTRS): source (N,) str, meta (N,) str (JSON or ""), orig_hw (N, 2),
             grid_hw (N, 2), img_sizes (N, S, 2), num_prefix_tokens (N,), split_mode (N,) str; with their layout
             flag: plan (N,) str (a strategy's plan, JSON), reduce (N,) str (JSON), frames (N,) int32 (videos)
  features/pooled with --dtype bfloat16: uint16 bits, dataset attribute encoding="bfloat16"
  features with --dtype int8: int8 codes, encoding="int8"; --dtype float8: uint8 bits of float8 e4m3fn (sign,
             4 exponent bits of bias 7, 3 mantissa bits, no infinities), encoding="float8_e4m3fn"; both with
             token_scales (N, T) or (sum T_i,) float32, row for row with `features`, and channel_scales (N, C)
             float32: value = code x token_scale x channel_scale; pooled vectors then float16
  failures   (M,) str          one JSON record per failed image: key, source, stage, error_class, error
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from ..dtypes import BF16, FLOAT8, INT8, QUANTIZED, RAW, decode, encode, pooled_dtype
from ..errors import ConfigError
from ..items import ATTRS, StoredItem, record
from ..readers import Reader, token_mean
from ..writers import LAYOUT_VERSION, ThreadedSink

STR = h5py.string_dtype("utf-8")
ENCODING_ATTR = "encoding"
ENCODINGS = {BF16: "bfloat16", INT8: "int8", FLOAT8: "float8_e4m3fn"}  # the dataset attribute of each encoded dtype
HDF5_CHUNK_BYTES = 1 << 16  # target chunk size of the per-row datasets (pooled, ragged features)
META_ROWS = 256  # rows per chunk of the small per-image datasets (keys, sizes, ...)


def _rows(row_bytes: int, cap: int = 1024) -> int:
    """Rows per chunk so that a chunk stays near HDF5_CHUNK_BYTES (a file of 8 vectors is not a MB-sized chunk)."""
    return max(1, min(cap, HDF5_CHUNK_BYTES // max(1, row_bytes)))


def _np(dtype: str) -> np.dtype:
    return RAW[dtype] if dtype in RAW else np.dtype(dtype)


class HDF5Sink(ThreadedSink):
    """Writes the layout in this module's docstring."""

    def _open(self) -> None:
        lay = self.layout
        # no HDF5 file lock: the temporary is this process's alone (named by its pid, in a claimed output) and is
        # read only once renamed whole; a lock would live on in every process forked meanwhile (a decode worker
        # started again mid-run shares the open file until it closes it) and refuse the run's own read-back
        f = self.f = h5py.File(self.tmp, "w", locking=False)
        for k, v in self.attrs.items():
            f.attrs[k] = v
        f.attrs["layout_version"] = LAYOUT_VERSION
        C, R, dt = lay.channels, META_ROWS, _np(lay.dtype)
        f.create_dataset("keys", (0,), STR, maxshape=(None,), chunks=(R,))
        for a in lay.attrs():
            if a.kind == "int":
                shape = a.shape_for(lay.num_scales)
                f.create_dataset(a.name, (0, *shape), a.int_dtype, maxshape=(None, *shape), chunks=(R, *shape))
            else:
                f.create_dataset(a.name, (0,), STR, maxshape=(None,), chunks=(R,))
        if lay.features:
            if lay.tokens is None:
                f.create_dataset("features", (0, C), dt, maxshape=(None, C), chunks=(_rows(C * dt.itemsize, 256), C))
                f.create_dataset("offsets", (1,), np.int64, maxshape=(None,), chunks=(R,), data=[0])
            else:
                f.create_dataset("features", (0, lay.tokens, C), dt, maxshape=(None, lay.tokens, C),
                                 chunks=(1, lay.tokens, C))
            if lay.dtype in QUANTIZED:
                rows = (0,) if lay.tokens is None else (0, lay.tokens)
                f.create_dataset("token_scales", rows, np.float32, maxshape=(None, *rows[1:]), chunks=(R, *rows[1:]))
                f.create_dataset("channel_scales", (0, C), np.float32, maxshape=(None, C), chunks=(_rows(4 * C), C))
        if lay.pooled:
            P, pdt = lay.pooled_width, _np(pooled_dtype(lay.dtype))
            f.create_dataset("pooled", (0, P), pdt, maxshape=(None, P), chunks=(_rows(P * pdt.itemsize), P))
        for name, dtype in (("features", lay.dtype), ("pooled", pooled_dtype(lay.dtype))):
            if name in f and dtype in ENCODINGS:
                f[name].attrs[ENCODING_ATTR] = ENCODINGS[dtype]

    def _append(self, items: list[StoredItem]) -> None:
        f, n, m, lay = self.f, self.n, len(items), self.layout

        def grow(name: str, values: Any) -> None:
            ds = f[name]
            ds.resize(n + m, axis=0)
            ds[n:n + m] = values

        grow("keys", [it.key for it in items])
        for a in lay.attrs():
            vals = [a.stored(it) for it in items]
            grow(a.name, np.array(vals, a.int_dtype) if a.kind == "int" else vals)
        if lay.pooled:
            grow("pooled", np.stack([encode(it.pooled, pooled_dtype(lay.dtype)).codes for it in items]))
        if not lay.features:
            return
        enc = [encode(it.features, lay.dtype) for it in items]
        feats = [e.codes.reshape(-1, e.codes.shape[-1]) for e in enc]  # a video's (F, T, C) as F x T rows
        quantized = lay.dtype in QUANTIZED
        if quantized:
            grow("channel_scales", np.stack([e.channel_scales for e in enc]))
        if lay.tokens is not None:
            ds = f["features"]
            ds.resize(n + m, axis=0)
            for i, x in enumerate(feats):  # one chunk per image, written from the item's own array (a slab of
                # several chunks, stacked first, went through HDF5's copies); in the stored dtype and the chunk's
                # shape, its bytes are the chunk (the dataset has no filters): written raw
                if x.dtype == ds.dtype and x.shape == ds.chunks[1:] and x.flags.c_contiguous:
                    ds.id.write_direct_chunk((n + i, 0, 0), x)
                else:
                    ds[n + i] = x
            if quantized:
                grow("token_scales", np.stack([e.token_scales for e in enc]))
            return
        off = f["offsets"]
        start = int(off[n])
        ends = np.cumsum([x.shape[0] for x in feats]) + start
        for name, parts in (("features", feats),) + ((("token_scales", [e.token_scales for e in enc]),) if quantized else ()):
            ds = f[name]
            ds.resize(int(ends[-1]), axis=0)
            ds[start:int(ends[-1])] = np.concatenate(parts, axis=0)
        off.resize(n + m + 1, axis=0)
        off[n + 1:n + m + 1] = ends

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


def _attr(v: Any) -> Any:
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, np.ndarray):
        v = v.tolist()
    return v


def _ragged_means(flat: np.ndarray, offsets: np.ndarray, prefix: np.ndarray) -> np.ndarray:
    """Means of the segments flat[offsets[i] + prefix[i]:offsets[i + 1]] (offsets relative to flat)."""
    cs = np.zeros((flat.shape[0] + 1, flat.shape[1]), np.float64)
    np.cumsum(flat, axis=0, dtype=np.float64, out=cs[1:])
    start = offsets[:-1] + prefix
    n = np.maximum(offsets[1:] - start, 1)[:, None]
    return ((cs[offsets[1:]] - cs[start]) / n).astype(np.float32)


class HDF5Reader(Reader):
    """One HDF5 file written by s2cli, read lazily."""

    def __init__(self, path: str | os.PathLike, raw: bool = False):
        self.path, self.raw = Path(path), raw
        try:
            self.f = h5py.File(self.path, "r")
        except BlockingIOError as e:  # HDF5's file lock: a writer (h5py, another tool) holds the file open
            raise ConfigError("the HDF5 file is locked: another process has it open for writing", given=str(path),
                              fix="wait for that process to close it, or read a copy") from e
        except OSError as e:
            raise ConfigError("not an HDF5 file", given=str(path), fix="pass a file written by `s2 extract`") from e
        if "keys" not in self.f:
            self.f.close()
            raise ConfigError("not an s2cli feature file (no keys dataset)", given=str(path),
                              fix="pass a file written by `s2 extract`")
        self._keys = [_attr(k) for k in self.f["keys"][:]]
        self._index = {k: i for i, k in enumerate(self._keys)}
        self.ragged = "offsets" in self.f
        self._offsets = self.f["offsets"][:] if self.ragged else None
        self._frames = self.f["frames"][:] if "frames" in self.f else None  # video entries: (F, T, C)
        by_encoding = {v: k for k, v in ENCODINGS.items()}
        self._dtypes = {n: by_encoding.get(_attr(self.f[n].attrs.get(ENCODING_ATTR)), str(self.f[n].dtype))
                        for n in ("features", "pooled") if n in self.f}

    def _rows(self, i: int) -> slice:
        return slice(int(self._offsets[i]), int(self._offsets[i + 1])) if self.ragged else slice(i, i + 1)

    def _features(self, i: int) -> np.ndarray:
        codes = self.f["features"][self._rows(i)]
        codes = codes if self.ragged else codes[0]
        dtype = self._dtypes["features"]
        if not self.raw:
            codes = decode(codes, dtype, *self._scales(i)) if dtype in QUANTIZED else decode(codes, dtype)
        frames = 0 if self._frames is None else int(self._frames[i])
        return codes.reshape(frames, -1, codes.shape[-1]) if frames else codes

    def _scales(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        ts = self.f["token_scales"][self._rows(i)]
        return (ts if self.ragged else ts[0]), self.f["channel_scales"][i]

    @property
    def attrs(self) -> dict[str, Any]:
        return {k: _attr(v) for k, v in self.f.attrs.items()}

    @property
    def failures(self) -> list[dict[str, str]]:
        return [json.loads(_attr(r)) for r in self.f["failures"][:]] if "failures" in self.f else []

    def _i(self, key: str) -> int:
        if key not in self._index:
            raise self._missing(key)
        return self._index[key]

    def __getitem__(self, key: str) -> np.ndarray:
        i = self._i(key)
        if "features" not in self.f:
            raise KeyError(f"{self.path} holds pooled vectors only (--pool-only); use .pooled({key!r})")
        return self._features(i)

    def scales(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        i = self._i(key)
        if "token_scales" not in self.f:
            raise KeyError(f"{self.path} holds no scales (its dtype is {self.dtype}, not int8 or float8)")
        return self._scales(i)

    def pooled(self, key: str) -> np.ndarray:
        if "pooled" not in self.f:
            raise KeyError(f"{self.path} has no pooled vectors (extract with --pool mean|cls)")
        x = self.f["pooled"][self._i(key)]
        return x if self.raw else decode(x, self._dtypes["pooled"])

    def _block(self, how: str, a: int, b: int, prefix: np.ndarray) -> np.ndarray:
        f = self.f
        if how == "pooled":
            return decode(f["pooled"][a:b], self._dtypes["pooled"]).astype(np.float32, copy=False)
        if (self._frames is not None and self._frames[a:b].any()) or self._dtypes["features"] in QUANTIZED:
            return np.stack([token_mean(self._features(a + i), int(prefix[a + i])) for i in range(b - a)])
        if self.ragged:
            off = self._offsets[a:b + 1].astype(np.int64)
            flat = decode(f["features"][int(off[0]):int(off[-1])], self._dtypes["features"])
            return _ragged_means(flat, off - off[0], prefix[a:b])
        x = decode(f["features"][a:b], self._dtypes["features"])
        p = int(prefix[a]) if (prefix[a:b] == prefix[a]).all() else None
        return (x[:, p:].mean(1, dtype=np.float32) if p is not None
                else np.stack([token_mean(x[i], int(prefix[a + i])) for i in range(b - a)]))

    def vector_blocks(self, how: str, block: int = 4096) -> Iterator[tuple[list[str], np.ndarray, list[dict[str, Any]]]]:
        """Bulk reads: one slice of each dataset per block (quantized features and videos: entry by entry)."""
        f = self.f
        if ("pooled" if how == "pooled" else "features") not in f or self.raw:
            yield from super().vector_blocks(how, block)  # raises the reader's own KeyError
            return
        prefix = f["num_prefix_tokens"][:].astype(np.int64)
        for a in range(0, len(self._keys), block):
            b = min(a + block, len(self._keys))
            cols = {n: f[n][a:b] for n in ("source", "meta") if n in f}
            recs = [record(k, {n: v[i] for n, v in cols.items()}) for i, k in enumerate(self._keys[a:b])]
            yield self._keys[a:b], self._block(how, a, b, prefix), [{"source": r["source"], "meta": r["meta"]} for r in recs]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def meta(self, key: str) -> dict[str, Any]:
        i, f = self._i(key), self.f
        return record(key, {a.name: f[a.name][i] for a in ATTRS if a.name in f})

    @property
    def feature_shape(self) -> list[int | None] | None:
        if "features" not in self.f:
            return None
        ds = self.f["features"]
        return [None, ds.shape[1]] if self.ragged else list(ds.shape[1:])

    @property
    def dtype(self) -> str:
        return self._dtypes["features" if "features" in self.f else "pooled"]

    def close(self) -> None:
        self.f.close()
