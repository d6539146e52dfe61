"""The safetensors format: its sink (tensors streamed to the file as they come, the header written last into
the room left for it before them) and its reader.

Layout: one tensor per image named by its key, (T, C) or a video's (F, T, C) (absent with --pool-only); with
--pool, one tensor `__s2cli_pooled__` (N, C) in the order of the `keys` list; with --dtype int8 (I8) or float8
(F8_E4M3) the scales beside each image's codes: `__s2cli_token_scales__/KEY` (rows,) and
`__s2cli_channel_scales__/KEY` (C,) float32 (value = code x token scale x channel scale; pooled vectors then F16).
Header metadata (strings): `s2cli` (the file attributes, as in HDF5, JSON), `keys` (JSON list, input order),
`images` (JSON: key -> its per-image attributes, items.ATTRS), `failures` (JSON list)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..dtypes import BF16, FLOAT8, INT8, QUANTIZED, decode, encode, pooled_dtype
from ..errors import ConfigError, S2Error
from ..items import StoredItem, record
from ..readers import Reader
from ..writers import LAYOUT_VERSION, ThreadedSink
from . import get

POOLED_TENSOR = "__s2cli_pooled__"
TOKEN_SCALES, CHANNEL_SCALES = "__s2cli_token_scales__/", "__s2cli_channel_scales__/"
RESERVED = "__s2cli_"  # no image key may start with it
ST_DTYPES = {"float32": "F32", "float16": "F16", BF16: "BF16", INT8: "I8", FLOAT8: "F8_E4M3"}
NP_OF = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "I8": np.dtype("i1"),
         "F8_E4M3": np.dtype("u1")}
HEADER_ROOM = 1 << 20  # bytes left for the header before the first tensor; a larger header moves the data once
MAX_PADDING = 64 << 10  # room left over past this (and 1% of the data) moves the data back instead of padding
MOVE_BLOCK = 1 << 20  # bytes moved at a time when it must


class SafetensorsSink(ThreadedSink):
    """Streams each image's tensors to the file as its batch is written (memory: the batches in the queue, and the
    pooled vectors); the header, known at the end, goes into the room left for it at the start, padded with spaces
    as safetensors allows (when it does not fit, or would leave much of the room empty, the data moves once,
    `MOVE_BLOCK` at a time)."""

    def _open(self) -> None:
        self.fh = open(self.tmp, "wb+")
        self.room = HEADER_ROOM
        self.fh.seek(8 + self.room)
        self.entries: dict[str, dict[str, Any]] = {}  # tensor name -> dtype, shape, data_offsets (in write order)
        self.data_end = 0  # bytes of tensor data written
        self.pooled_rows: list[np.ndarray] = []
        self.images: dict[str, dict[str, Any]] = {}

    def _put(self, name: str, dtype: str, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a)
        self.fh.write(memoryview(a.reshape(-1).view(np.uint8)))
        self.entries[name] = {"dtype": ST_DTYPES[dtype], "shape": list(a.shape), "data_offsets": [self.data_end, self.data_end + a.nbytes]}
        self.data_end += a.nbytes

    def _append(self, items: list[StoredItem]) -> None:
        lay = self.layout
        for it in items:
            k = it.key
            if k in self.images or k.startswith(RESERVED):
                raise S2Error(f"key {k!r} appears twice in one safetensors shard" if k in self.images else
                              f"key {k!r} starts with {RESERVED!r}, which s2cli's own tensors use", fix="make keys unique")
            if lay.features:
                enc = encode(it.features, lay.dtype)
                self._put(k, lay.dtype, enc.codes)
                if enc.token_scales is not None:
                    self._put(TOKEN_SCALES + k, "float32", enc.token_scales)
                    self._put(CHANNEL_SCALES + k, "float32", enc.channel_scales)  # type: ignore[arg-type]
            if lay.pooled:
                self.pooled_rows.append(encode(it.pooled, pooled_dtype(lay.dtype)).codes)
            self.images[k] = {a.name: a.stored(it) for a in lay.attrs() if not (a.sparse and not a.stored(it))}

    def _header(self) -> bytes:
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in self.attrs.items()}
        attrs.update(num_images=self.n, num_failed=len(self.failures), layout_version=LAYOUT_VERSION)
        meta = {"s2cli": json.dumps(attrs), "keys": json.dumps(list(self.images)), "images": json.dumps(self.images),
                "failures": json.dumps(self.failures)}
        return json.dumps({"__metadata__": meta, **self.entries}, separators=(",", ":")).encode()

    def _finish(self) -> None:
        if self.pooled_rows:
            self._put(POOLED_TENSOR, pooled_dtype(self.layout.dtype), np.stack(self.pooled_rows))
        header = self._header()
        limit = get("safetensors").header_limit or len(header)
        if len(header) > limit:
            fit = max(1, int(self.n * limit / len(header) * 0.9))
            raise S2Error(f"the safetensors header of {self.path.name} would take {len(header):,} bytes, over the format's "
                          f"limit of {limit:,}: {self.n} images and their metadata in one shard",
                          given=f"--shard-size {self.n}", expected=f"about {fit} images per shard or fewer",
                          fix=f"pass --shard-size {fit} (finished shards are kept), or --format h5")
        room = -(-len(header) // 8) * 8  # the data starts 8-byte aligned, as safetensors writes it
        if room > self.room:
            self._reserve(room - self.room)
        if room > self.room or self.room - room > max(MAX_PADDING, self.data_end // 100):
            self._move_data(room - self.room)  # too little room, or too much left over: the data moves once
            self.room = room
        self.fh.seek(0)
        self.fh.write(len(header.ljust(self.room)).to_bytes(8, "little") + header.ljust(self.room))
        self.fh.truncate(8 + self.room + self.data_end)
        self.fh.flush()
        self.fh.close()

    def _move_data(self, by: int) -> None:
        """Move the tensor data `by` bytes (towards the end: the last block first; towards the start: the first
        block first), `MOVE_BLOCK` at a time."""
        start, stop = 8 + self.room, 8 + self.room + self.data_end
        blocks = [(a, min(MOVE_BLOCK, stop - a)) for a in range(start, stop, MOVE_BLOCK)]
        for a, n in reversed(blocks) if by > 0 else blocks:
            self.fh.seek(a)
            block = self.fh.read(n)
            self.fh.seek(a + by)
            self.fh.write(block)

    def _discard(self) -> None:
        try:
            self.fh.close()
        except Exception:
            pass
        self.pooled_rows = []


class SafetensorsReader(Reader):
    """One safetensors file written by s2cli."""

    def __init__(self, path: str | os.PathLike, raw: bool = False):
        from safetensors import safe_open

        self.path, self.raw = Path(path), raw
        try:
            self.f = safe_open(str(self.path), framework="numpy")
        except Exception as e:
            raise ConfigError("not a safetensors file", given=str(path), fix="pass a file written by `s2 extract`") from e
        md = self.f.metadata() or {}
        if "s2cli" not in md:
            raise ConfigError("not an s2cli feature file (no s2cli metadata)", given=str(path),
                              fix="pass a file written by `s2 extract`")
        try:
            self._attrs = json.loads(md["s2cli"])
            self._keys = json.loads(md["keys"])
            self._images = json.loads(md["images"])
            self._failures = json.loads(md["failures"])
        except (KeyError, ValueError) as e:
            raise ConfigError(f"the s2cli metadata of {path} is damaged ({type(e).__name__}: {e})", given=str(path),
                              fix="extract it again (in an output folder: rerun the same command, which redoes a "
                                  "shard it cannot read)") from None
        self._index = {k: i for i, k in enumerate(self._keys)}
        self._names = set(self.f.keys())
        self._raw: np.ndarray | None = None  # the file mapped as bytes, for dtypes numpy lacks (BF16, F8_E4M3)

    def _codes(self, name: str) -> np.ndarray:
        """A tensor as stored: BF16 as uint16 bits, F8_E4M3 as uint8 bits (read from the mapped file)."""
        sl = self.f.get_slice(name)
        if sl.get_dtype() not in ("BF16", "F8_E4M3"):
            return self.f.get_tensor(name)
        if self._raw is None:
            self._raw = np.memmap(self.path, dtype=np.uint8, mode="r")
            n = int(self._raw[:8].view("<u8")[0])
            self._header = json.loads(bytes(self._raw[8:8 + n]))
            self._data_start = 8 + n
        a, b = self._header[name]["data_offsets"]
        return np.array(self._raw[self._data_start + a:self._data_start + b].view(NP_OF[sl.get_dtype()]).reshape(sl.get_shape()))

    def _stored_dtype(self, name: str) -> str:
        st = self.f.get_slice(name).get_dtype()
        return next((k for k, v in ST_DTYPES.items() if v == st), st)

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self._attrs)

    @property
    def failures(self) -> list[dict[str, str]]:
        return list(self._failures)

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._index:
            raise self._missing(key)
        if key not in self._names:
            raise KeyError(f"{self.path} holds pooled vectors only (--pool-only); use .pooled({key!r})")
        codes, dtype = self._codes(key), self._stored_dtype(key)
        if self.raw:
            return codes
        return decode(codes, dtype, *self.scales(key)) if dtype in QUANTIZED else decode(codes, dtype)

    def scales(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        if key not in self._index:
            raise self._missing(key)
        if TOKEN_SCALES + key not in self._names:
            raise KeyError(f"{self.path} holds no scales for {key!r} (its dtype is {self.dtype}, not int8 or float8)")
        return self.f.get_tensor(TOKEN_SCALES + key), self.f.get_tensor(CHANNEL_SCALES + key)

    def _pooled_all(self) -> np.ndarray:
        x = self._codes(POOLED_TENSOR)
        return x if self.raw else decode(x, self._stored_dtype(POOLED_TENSOR))

    def pooled(self, key: str) -> np.ndarray:
        if key not in self._index:
            raise self._missing(key)
        if POOLED_TENSOR not in self._names:
            raise KeyError(f"{self.path} has no pooled vectors (extract with --pool mean|cls)")
        if self.f.get_slice(POOLED_TENSOR).get_dtype() == "BF16":
            return self._pooled_all()[self._index[key]]
        return self.f.get_slice(POOLED_TENSOR)[self._index[key]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def vector_blocks(self, how: str, block: int = 4096) -> Iterator[tuple[list[str], np.ndarray, list[dict[str, Any]]]]:
        """Pooled vectors: the one pooled tensor read at once; token means: per key."""
        if how != "pooled" or POOLED_TENSOR not in self._names or self.raw:
            yield from super().vector_blocks(how, block)
            return
        vecs = self._pooled_all().astype(np.float32, copy=False)
        for a in range(0, len(self._keys), block):
            part = self._keys[a:a + block]
            recs = [record(k, self._images[k]) for k in part]
            yield part, vecs[a:a + block], [{"source": r["source"], "meta": r["meta"]} for r in recs]

    def meta(self, key: str) -> dict[str, Any]:
        if key not in self._index:
            raise self._missing(key)
        return record(key, self._images[key])

    @property
    def feature_shape(self) -> list[int | None] | None:
        shapes = {tuple(self.f.get_slice(k).get_shape()) for k in self._keys[:64] if k in self._names}
        if not shapes:
            return None
        if len(shapes) == 1:
            return list(next(iter(shapes)))
        return [None, next(iter(shapes))[-1]]

    @property
    def dtype(self) -> str:
        name = next((k for k in self._keys if k in self._names), POOLED_TENSOR if POOLED_TENSOR in self._names else None)
        return self._stored_dtype(name) if name is not None else str(self._attrs.get("dtype", "float32"))

    def close(self) -> None:
        self.f = self._raw = None  # safe_open has no close; the mmap goes with the object
