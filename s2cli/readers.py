"""Readers: features written by `s2 extract` read back lazily by key, from one HDF5 or safetensors file or from an
output folder of shards, all behind one `Reader` interface; `open_features` picks the reader for a path."""
from __future__ import annotations

import itertools
import json
import os
from abc import abstractmethod
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from .errors import ConfigError
from .fsutil import claim_held
from .heartbeat import liveness, read_heartbeats
from .layers import pick_index, split_rows, split_vector, stored_layers
from .outdir import OutputDir
from .store import folder, local_of
from .writers import BF16, ENCODING_ATTR, POOLED_TENSOR, format_of, from_bf16_bits


def _attr(v: Any) -> Any:
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, np.ndarray):
        v = v.tolist()
    return v


class Reader(Mapping):
    """What every reader of s2cli features offers: a read-only mapping key -> features (T, C) numpy array (bfloat16
    storage decoded to float32, exactly), in input order, plus each image's metadata and pooled vector, the file attributes and the resolved config, the
    failure records, the feature shape and dtype; `close` (or use it as a context manager)."""

    path: Path

    @property
    @abstractmethod
    def attrs(self) -> dict[str, Any]:
        """The attributes written with the features (model, scales, dtype, config as JSON, ...)."""

    @property
    @abstractmethod
    def failures(self) -> list[dict[str, str]]:
        """One record per image that failed: key, source, stage, error_class, error."""

    @property
    @abstractmethod
    def feature_shape(self) -> list[int | None] | None:
        """(T, C) of one image's features, T None where token counts differ; None when only pooled vectors are stored."""

    @property
    @abstractmethod
    def dtype(self) -> str:
        """The stored dtype, e.g. float32."""

    @abstractmethod
    def __getitem__(self, key: str) -> np.ndarray:
        """The features (T, C) of one image."""

    @abstractmethod
    def __iter__(self) -> Iterator[str]:
        """Image keys, in input order."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def pooled(self, key: str) -> np.ndarray:
        """The pooled vector (C,) of one image (extracted with --pool mean|cls)."""

    @abstractmethod
    def meta(self, key: str) -> dict[str, Any]:
        """One image's record: key, source, meta, orig_hw, grid_hw, img_sizes, num_prefix_tokens, split_mode."""

    @abstractmethod
    def close(self) -> None: ...

    def vector_blocks(self, how: str, block: int = 4096) -> Iterator[tuple[list[str], np.ndarray, list[dict[str, Any]]]]:
        """One vector per image, in input order, `block` images at a time: (keys, (n, C) float32, records with
        `source` and `meta`). `how`: "pooled" (the stored pooled vectors) or "mean" (the mean of each image's
        spatial tokens, prefix tokens left out). Readers override it with bulk reads; this is the per-key way."""
        keys = list(self)
        for a in range(0, len(keys), block):
            part = keys[a:a + block]
            vecs = np.stack([self.pooled(k) if how == "pooled" else _token_mean(self[k], self.meta(k)["num_prefix_tokens"])
                             for k in part]).astype(np.float32, copy=False)
            yield part, vecs, [{"source": m["source"], "meta": m["meta"]} for m in map(self.meta, part)]

    @property
    def config(self) -> dict[str, Any]:
        """The resolved config the features were extracted with."""
        return json.loads(self.attrs.get("config", "{}"))

    def _missing(self, key: str) -> KeyError:
        return KeyError(f"no image with key {key!r} in {self.path} ({len(self)} keys; see `s2 inspect`)")

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _token_mean(x: np.ndarray, prefix: int) -> np.ndarray:
    """The mean of an entry's tokens past its prefix tokens (a video's: over all its frames' tokens)."""
    x = np.asarray(x, np.float32)
    return x[:, prefix:].mean((0, 1)) if x.ndim == 3 else x[prefix:].mean(0)


def _video_fields(m: dict[str, Any]) -> dict[str, Any]:
    """A video entry's record with its frames' `frame_indices` and `timestamps` (seconds) at the top, from the
    `video` facts in its metadata (also those of one frame stored with --frames-as-images)."""
    v = (m.get("meta") or {}).get("video") if isinstance(m.get("meta"), dict) else None
    if not isinstance(v, dict):
        return m
    if "frame_indices" in v:
        return {**m, "frame_indices": v["frame_indices"], "timestamps": v["timestamps"]}
    return {**m, "frame_index": v.get("frame_index"), "timestamp": v.get("timestamp")}


def _ragged_means(flat: np.ndarray, offsets: np.ndarray, prefix: np.ndarray) -> np.ndarray:
    """Means of the segments flat[offsets[i] + prefix[i]:offsets[i + 1]] (offsets relative to flat)."""
    cs = np.zeros((flat.shape[0] + 1, flat.shape[1]), np.float64)
    np.cumsum(flat, axis=0, dtype=np.float64, out=cs[1:])
    start = offsets[:-1] + prefix
    n = np.maximum(offsets[1:] - start, 1)[:, None]
    return ((cs[offsets[1:]] - cs[start]) / n).astype(np.float32)


class FeatureFile(Reader):
    """One HDF5 file written by s2cli, read lazily."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.f = h5py.File(self.path, "r")
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
        self._bf16 = {n for n in ("features", "pooled") if n in self.f and _attr(self.f[n].attrs.get(ENCODING_ATTR)) == BF16}

    def _decode(self, name: str, x: np.ndarray) -> np.ndarray:
        return from_bf16_bits(x) if name in self._bf16 else x

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
        if self.ragged:
            x = self._decode("features", self.f["features"][int(self._offsets[i]):int(self._offsets[i + 1])])
            frames = 0 if self._frames is None else int(self._frames[i])
            return x.reshape(frames, -1, x.shape[-1]) if frames else x
        return self._decode("features", self.f["features"][i])

    def pooled(self, key: str) -> np.ndarray:
        if "pooled" not in self.f:
            raise KeyError(f"{self.path} has no pooled vectors (extract with --pool mean|cls)")
        return self._decode("pooled", self.f["pooled"][self._i(key)])

    def vector_blocks(self, how: str, block: int = 4096) -> Iterator[tuple[list[str], np.ndarray, list[dict[str, Any]]]]:
        """Bulk reads: one slice of each dataset per block."""
        f = self.f
        name = "pooled" if how == "pooled" else "features"
        if name not in f:
            yield from super().vector_blocks(how, block)  # raises the reader's own KeyError
            return
        prefix = f["num_prefix_tokens"][:].astype(np.int64)
        for a in range(0, len(self._keys), block):
            b = min(a + block, len(self._keys))
            if how == "pooled":
                vecs = self._decode("pooled", f["pooled"][a:b]).astype(np.float32, copy=False)
            elif self._frames is not None and self._frames[a:b].any():  # videos: each entry's own mean
                vecs = np.stack([_token_mean(self[k], int(prefix[a + i])) for i, k in enumerate(self._keys[a:b])])
            elif self.ragged:
                off = self._offsets[a:b + 1].astype(np.int64)
                flat = self._decode("features", f["features"][int(off[0]):int(off[-1])])
                vecs = _ragged_means(flat, off - off[0], prefix[a:b])
            else:
                x = self._decode("features", f["features"][a:b])
                p = int(prefix[a]) if (prefix[a:b] == prefix[a]).all() else None
                vecs = (x[:, p:].mean(1, dtype=np.float32) if p is not None
                        else np.stack([_token_mean(x[i], int(prefix[a + i])) for i in range(b - a)]))
            metas = [_attr(m) for m in f["meta"][a:b]] if "meta" in f else [""] * (b - a)
            recs = [{"source": _attr(s), "meta": json.loads(m) if m else None} for s, m in zip(f["source"][a:b], metas)]
            yield self._keys[a:b], vecs, recs

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def meta(self, key: str) -> dict[str, Any]:
        i, f = self._i(key), self.f
        m = _attr(f["meta"][i]) if "meta" in f else ""
        return _video_fields({
            "key": key, "source": _attr(f["source"][i]), "meta": json.loads(m) if m else None,
            "orig_hw": f["orig_hw"][i].tolist(), "grid_hw": f["grid_hw"][i].tolist(),
            "img_sizes": f["img_sizes"][i].tolist(), "num_prefix_tokens": int(f["num_prefix_tokens"][i]),
            "split_mode": _attr(f["split_mode"][i]), **{n: json.loads(_attr(f[n][i])) for n in ("plan", "reduce") if n in f},
            **({"frames": int(self._frames[i])} if self._frames is not None and self._frames[i] else {})})

    @property
    def feature_shape(self) -> list[int | None] | None:
        if "features" not in self.f:
            return None
        ds = self.f["features"]
        return [None, ds.shape[1]] if self.ragged else list(ds.shape[1:])

    @property
    def dtype(self) -> str:
        name = "features" if "features" in self.f else "pooled"
        return BF16 if name in self._bf16 else str(self.f[name].dtype)

    def close(self) -> None:
        self.f.close()


class SafetensorsFeatureFile(Reader):
    """One safetensors shard written by s2cli."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self.path = Path(path)
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
        self._raw: np.ndarray | None = None  # the file mapped as bytes, for BF16 tensors (numpy has no bfloat16)

    def _tensor(self, name: str) -> np.ndarray:
        sl = self.f.get_slice(name)
        if sl.get_dtype() != "BF16":
            return self.f.get_tensor(name)
        if self._raw is None:
            self._raw = np.memmap(self.path, dtype=np.uint8, mode="r")
            n = int(self._raw[:8].view("<u8")[0])
            self._header = json.loads(bytes(self._raw[8:8 + n]))
            self._data_start = 8 + n
        a, b = self._header[name]["data_offsets"]
        bits = self._raw[self._data_start + a:self._data_start + b].view("<u2").reshape(sl.get_shape())
        return from_bf16_bits(bits)

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
        return self._tensor(key)

    def pooled(self, key: str) -> np.ndarray:
        if key not in self._index:
            raise self._missing(key)
        if POOLED_TENSOR not in self._names:
            raise KeyError(f"{self.path} has no pooled vectors (extract with --pool mean|cls)")
        sl = self.f.get_slice(POOLED_TENSOR)
        if sl.get_dtype() == "BF16":
            return self._tensor(POOLED_TENSOR)[self._index[key]]
        return sl[self._index[key]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def vector_blocks(self, how: str, block: int = 4096) -> Iterator[tuple[list[str], np.ndarray, list[dict[str, Any]]]]:
        """Pooled vectors: the one pooled tensor read at once; token means: per key."""
        if how != "pooled" or POOLED_TENSOR not in self._names:
            yield from super().vector_blocks(how, block)
            return
        vecs = self._tensor(POOLED_TENSOR).astype(np.float32, copy=False)
        for a in range(0, len(self._keys), block):
            part = self._keys[a:a + block]
            yield part, vecs[a:a + block], [{"source": self._images[k]["source"],
                                             "meta": json.loads(self._images[k]["meta"]) if self._images[k].get("meta") else None}
                                            for k in part]

    def meta(self, key: str) -> dict[str, Any]:
        if key not in self._index:
            raise self._missing(key)
        m = dict(self._images[key])
        m["meta"] = json.loads(m["meta"]) if m.get("meta") else None
        for n in ("plan", "reduce"):
            if n in m:
                m[n] = json.loads(m[n])
        return _video_fields({"key": key, **m})

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
        if name is None:
            return str(np.dtype(self._attrs.get("dtype", "float32")))
        return {"F32": "float32", "F16": "float16", "BF16": BF16}.get(self.f.get_slice(name).get_dtype(), self.f.get_slice(name).get_dtype())

    def close(self) -> None:
        self.f = self._raw = None  # safe_open has no close; the mmap goes with the object


class FeatureSet(Reader):
    """An output directory read as one mapping across its completed shards (those with a done marker)."""

    def __init__(self, path: str | os.PathLike, max_open: int = 32, verify: bool = False):
        self.dir = OutputDir(path)  # local, or remote storage (its shards are downloaded to a local cache)
        self.path = self.dir.path
        self.run = self.dir.read_run(fix="pass a folder written by `s2 extract -o OUTDIR/`")
        markers, self.broken = self.dir.scan(verify)  # broken: marked shards skipped, each with why
        self._markers: list[dict[str, Any]] = []
        self._where: dict[str, int] = {}
        self._shard_keys: list[list[str]] = []
        self._shadowed: list[dict[str, str]] = []  # a key already in an earlier shard: the first is kept
        for m in markers:
            try:
                ks = shard_keys(self.dir.folder.fetch(m["shard"]))
            except (ConfigError, OSError, ValueError, KeyError) as e:
                self.broken.append({**m, "broken": f"cannot be read: {e}"})
                continue
            if len(ks) != m.get("num_images", len(ks)):
                self.broken.append({**m, "broken": f"holds {len(ks)} keys where its marker recorded {m['num_images']}"})
                continue
            i = len(self._markers)
            self._markers.append(m)
            self._shard_keys.append(ks)
            for k in ks:
                if self._where.setdefault(k, i) != i:
                    self._shadowed.append({"key": k, "source": m["shard"], "stage": "read", "error_class": "DuplicateKey",
                                           "error": f"key {k!r} is also in {self._markers[self._where[k]]['shard']}, "
                                                    f"which comes first and is kept ({m['shard']} holds it again)"})
        self._open: OrderedDict[int, Reader] = OrderedDict()
        self.max_open = max_open

    def _reader(self, i: int) -> Reader:
        if i in self._open:
            self._open.move_to_end(i)
            return self._open[i]
        r = _open_file(self.dir.folder.fetch(self._markers[i]["shard"]))
        self._open[i] = r
        if len(self._open) > self.max_open:
            self._open.popitem(last=False)[1].close()
        return r

    def _shard_of(self, key: str) -> Reader:
        if key not in self._where:
            raise self._missing(key)
        return self._reader(self._where[key])

    def __getitem__(self, key: str) -> np.ndarray:
        return self._shard_of(key)[key]

    def pooled(self, key: str) -> np.ndarray:
        return self._shard_of(key).pooled(key)

    def vector_blocks(self, how: str, block: int = 4096) -> Iterator[tuple[list[str], np.ndarray, list[dict[str, Any]]]]:
        """Each shard's bulk reads in turn (a key kept by an earlier shard is skipped, as iteration does)."""
        for i in range(len(self._markers)):
            for keys, vecs, recs in self._reader(i).vector_blocks(how, block):
                keep = [j for j, k in enumerate(keys) if self._where[k] == i]
                if len(keep) < len(keys):
                    keys, vecs, recs = [keys[j] for j in keep], vecs[keep], [recs[j] for j in keep]
                if keys:
                    yield keys, vecs, recs

    def meta(self, key: str) -> dict[str, Any]:
        return {**self._shard_of(key).meta(key), "shard": self._markers[self._where[key]]["shard"]}

    def __iter__(self) -> Iterator[str]:
        seen = set()
        for ks in self._shard_keys:
            for k in ks:
                if k not in seen:
                    seen.add(k)
                    yield k

    def __len__(self) -> int:
        return len(self._where)

    @property
    def attrs(self) -> dict[str, Any]:
        if self._markers:
            return self._reader(0).attrs
        from .config import FILE_ATTRS, JSON_ATTRS  # no shard yet: what run.json says the shards will carry

        cfg = self.run["config"]
        strategy = cfg.get("strategy")
        attrs = {k: json.dumps(cfg.get(k)) if k in JSON_ATTRS else cfg.get(k) for k in FILE_ATTRS}
        attrs.update(strategy=strategy.get("name") if isinstance(strategy, dict) else strategy or "s2",
                     weights=cfg.get("weights_revision"), s2cli_version=self.run.get("s2cli_version"),
                     config=json.dumps(cfg))
        return attrs

    @property
    def failures(self) -> list[dict[str, str]]:
        """The failures of the readable shards, and keys that a later shard holds again (only the first is read)."""
        return [r for m in self._markers for r in m["failures"]] + self._shadowed

    @property
    def shards(self) -> list[dict[str, Any]]:
        return [{k: m[k] for k in ("shard", "unit", "part", "num_images", "num_failed")} for m in self._markers]

    @property
    def broken_shards(self) -> list[dict[str, Any]]:
        """Marked shards that are skipped: not whole (another size; with verify: other bytes) or unreadable."""
        return [{"shard": m["shard"], "unit": m.get("unit"), "num_images": m.get("num_images"), "why": m["broken"]}
                for m in self.broken]

    @property
    def writing(self) -> list[str]:
        """The ranks of a run that is writing this folder now (`rank R: host H pid P`); [] when none is."""
        return [f"rank {r}: host {hb.get('host')} pid {hb.get('pid')}" for r, hb in sorted(read_heartbeats(self.dir.folder).items())
                if liveness(hb) == "running"]

    @property
    def complete(self) -> bool:
        """Every unit of the input is in a whole shard: the manifest says so and no shard is broken."""
        return self.dir.manifest_complete and not self.broken

    @property
    def feature_shape(self) -> list[int | None] | None:
        shapes = [self._reader(i).feature_shape for i in range(len(self._markers))][:8]
        shapes = [s for s in shapes if s is not None]
        if not shapes:
            return None
        return shapes[0] if all(s == shapes[0] for s in shapes) else [None, shapes[0][-1]]

    @property
    def dtype(self) -> str:
        return self._reader(0).dtype if self._markers else self.run["config"].get("dtype", "float32")

    def close(self) -> None:
        for r in self._open.values():
            r.close()
        self._open.clear()
        self.dir.folder.close()  # a remote folder's downloaded shards

    def size_bytes(self) -> int:
        return sum(self.dir.folder.size(s["shard"]) for s in self.shards)


def _open_file(path: Path) -> Reader:
    if not path.is_file():
        writer = claim_held(path.with_name(f".{path.name}.lock"))
        if writer:  # a single file appears only when its run has written all of it
            raise ConfigError(f"{path} is being written by a run ({writer}); it appears when that run ends",
                              given=str(path), fix="wait for that run to end (a folder, -o OUTDIR/, can be read while "
                                                   "it is written)")
        raise ConfigError("no such feature file", given=str(path), fix="pass a file or folder written by `s2 extract`")
    return SafetensorsFeatureFile(path) if format_of(path) == "safetensors" else FeatureFile(path)


def shard_keys(path: str | os.PathLike) -> list[str]:
    """The keys one feature file holds, in order."""
    with _open_file(Path(path)) as r:
        return list(r)


def open_features(path: str | os.PathLike, verify: bool = False, layer: int | None = None) -> Reader:
    """Open features written by `s2 extract` (below); `layer`: of an output of several layers (--layers), the one to
    read ((T, C) features, (C,) pooled vectors; None: all of them, (L, T, C) and (L, C)), by its index as --layers
    listed it."""
    return pick_layer(_open_features(path, verify), layer)


def pick_layer(r: Reader, layer: int | None) -> Reader:
    """`r` read at one of its stored layers, or all (`LayerPick`); `r` itself when it stores one layer plainly and
    `layer` is None or that layer."""
    layers = stored_layers(r.attrs)
    if layers is None:
        if layer is not None and layer != r.attrs.get("layer"):
            r.close()
            raise ConfigError("this output stores one layer", given=f"layer={layer!r} in {r.path}",
                              expected=f"{r.attrs.get('layer')} or none", fix="drop layer=, or extract with --layers")
        return r
    try:
        return LayerPick(r, layers, pick_index(layers, layer, r.path))
    except ConfigError:
        r.close()
        raise


class LayerPick(Reader):
    """An output of several layers (--layers) read at one (`index` into `layers`) or all (index None). Stored
    layer-major, an image's features as L*T rows and its pooled vector as one row of L*C (`layers.py`); read back
    as (T, C) and (C,) for one layer, (L, T, C) and (L, C) for all (a video's frames first: (F, ...))."""

    def __init__(self, inner: Reader, layers: list[int], index: int | None):
        self.inner, self.layers, self.index, self.path = inner, layers, index, inner.path

    def __getattr__(self, name: str) -> Any:  # a folder's shards, completeness, size, ...
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def attrs(self) -> dict[str, Any]:
        return self.inner.attrs

    @property
    def failures(self) -> list[dict[str, str]]:
        return self.inner.failures

    @property
    def feature_shape(self) -> list[int | None] | None:
        s = self.inner.feature_shape
        if s is None:
            return None
        t = None if s[-2] is None else s[-2] // len(self.layers)
        return [t, s[-1]] if self.index is not None else [len(self.layers), t, s[-1]]

    @property
    def dtype(self) -> str:
        return self.inner.dtype

    def __getitem__(self, key: str) -> np.ndarray:
        x = split_rows(self.inner[key], len(self.layers))
        return x if self.index is None else x[..., self.index, :, :]

    def __iter__(self) -> Iterator[str]:
        return iter(self.inner)

    def __len__(self) -> int:
        return len(self.inner)

    def __contains__(self, key: object) -> bool:
        return key in self.inner

    def pooled(self, key: str) -> np.ndarray:
        x = split_vector(self.inner.pooled(key), len(self.layers))
        return x if self.index is None else x[..., self.index, :]

    def meta(self, key: str) -> dict[str, Any]:
        return self.inner.meta(key)

    def vector_blocks(self, how: str, block: int = 4096) -> Iterator[tuple[list[str], np.ndarray, list[dict[str, Any]]]]:
        """The picked layer's vectors; all layers': each layer's vector, side by side (L*C)."""
        n, i = len(self.layers), self.index
        if how == "pooled":
            for keys, vecs, recs in self.inner.vector_blocks(how, block):
                v = split_vector(vecs, n)
                yield keys, (v.reshape(len(keys), -1) if i is None else v[:, i]), recs
            return
        keys = list(self)
        for a in range(0, len(keys), block):
            part = keys[a:a + block]
            metas = [self.meta(k) for k in part]
            vecs = []
            for k, m in zip(part, metas):
                x = split_rows(np.asarray(self.inner[k], np.float32), n)  # (..., L, T, C)
                x = x[..., m["num_prefix_tokens"]:, :]
                per = x.reshape(-1, *x.shape[-3:]).mean((0, 2))  # (L, C): a video's frames and the tokens
                vecs.append(per.reshape(-1) if i is None else per[i])
            yield part, np.stack(vecs), [{"source": m["source"], "meta": m["meta"]} for m in metas]

    def close(self) -> None:
        self.inner.close()


def _open_features(path: str | os.PathLike, verify: bool = False) -> Reader:
    """Open features written by `s2 extract` for lazy reading by key: one .h5 or .safetensors file, or an
    output folder of shards (read across its completed shards; a shard whose size is not the one its marker
    recorded, or that cannot be read, is skipped and listed in `broken_shards`; `verify`: every shard's sha256
    is checked too). An output folder's URL (s3://, gs://, any fsspec URL) is read from remote storage: its
    shards are downloaded to a local cache as they are needed, removed when the reader closes."""
    if local_of(path) is None:
        if format_of(str(path)) is not None:  # s2 extract writes none there either
            raise ConfigError("a single feature file on remote storage is not read in place", given=str(path),
                              fix="copy it to a local file first, or pass the URL of an output folder")
        return FeatureSet(folder(str(path)), verify=verify)
    p = Path(local_of(path))  # type: ignore[arg-type]
    if p.is_dir():
        return FeatureSet(p, verify=verify)
    return _open_file(p)


def summary(ff: Reader) -> dict[str, Any]:
    """What `s2 inspect PATH` shows: the attributes every output carries (config.FILE_ATTRS), counts, failures,
    shape, dtype, size on disk, and for a folder its shards and whether the run is complete."""
    from .config import FILE_ATTRS, JSON_ATTRS  # config -> writers; readers is not imported by either

    a = ff.attrs
    fails = ff.failures
    report = {
        "num_images": len(ff), "num_failed": len(fails),
        "failed": [{k: f[k] for k in ("key", "source", "stage", "error_class", "error")} for f in fails],
        "weights": a.get("weights"),
        **{k: json.loads(a.get(k, "null")) if k in JSON_ATTRS else a.get(k) for k in FILE_ATTRS},
        "feature_shape": ff.feature_shape, "dtype": ff.dtype, "s2cli_version": a.get("s2cli_version"),
    }
    report["pool"] = report["pool"] or "none"  # files written before --pool
    if isinstance(getattr(ff, "inner", ff), FeatureSet):
        report.update(size_bytes=ff.size_bytes(),
                      num_shards=len(ff.shards), complete=ff.complete, broken_shards=ff.broken_shards,
                      writing=ff.writing)
    else:
        report["size_bytes"] = Path(ff.path).stat().st_size
    return report


def image_summary(ff: Reader, key: str) -> dict[str, Any]:
    """What `s2 inspect PATH --key K` shows: the image's metadata, feature shape and statistics."""
    m = ff.meta(key)
    try:
        x = np.asarray(ff[key], dtype=np.float64)
    except KeyError:  # --pool-only
        x = np.asarray(ff.pooled(key), dtype=np.float64)
    return {**m, "shape": list(x.shape), "mean": float(x.mean()), "std": float(x.std()),
            "finite": bool(np.isfinite(x).all())}


def list_keys(ff: Reader, limit: int | None = None) -> list[str]:
    """The image keys, in order (the first `limit`)."""
    if limit is not None and limit < 0:
        raise ConfigError("--limit must be >= 0", given=limit, fix="pass e.g. --limit 10")
    return list(itertools.islice(iter(ff), limit))
