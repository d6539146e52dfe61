"""Readers: features written by `s2 extract` read back lazily by key, from one output of a format (formats/: each
format's reader) or from an output folder of shards, all behind one `Reader` interface; `open_features` picks the
reader for a path."""
from __future__ import annotations

import copy
import itertools
import json
import os
from abc import abstractmethod
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from . import formats
from .errors import ConfigError, S2Error
from .fsutil import claim_held
from .heartbeat import liveness, read_heartbeats
from .layers import pick_index, split_rows, split_vector, stored_layers
from .outdir import OutputDir, gc_paused
from .store import folder, local_of


class Reader(Mapping):
    """What every reader of s2cli features offers: a read-only mapping key -> features (T, C) numpy array (bfloat16
    storage decoded to float32, exactly; int8/float8 codes times their scales, in float32), in input order, plus
    each image's metadata and pooled vector, the file attributes and the resolved config, the failure records, the
    feature shape and dtype; `close` (or use it as a context manager). Opened with `raw=True`, features and pooled
    vectors are the stored codes (bfloat16 and float8 as their bits), and `scales(key)` gives int8/float8 scales."""

    path: Path
    raw: bool = False

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
        """One image's record (`items.record`): key and its per-image attributes (`items.ATTRS`)."""

    def scales(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """int8/float8 storage: one image's (token scales (rows,), channel scales (C,)); value = code x both."""
        raise KeyError(f"{self.path} holds no scales (its dtype is {self.dtype}, not int8 or float8)")

    @abstractmethod
    def close(self) -> None: ...

    def vector_blocks(self, how: str, block: int = 4096) -> Iterator[tuple[list[str], np.ndarray, list[dict[str, Any]]]]:
        """One vector per image, in input order, `block` images at a time: (keys, (n, C) float32, records with
        `source` and `meta`). `how`: "pooled" (the stored pooled vectors) or "mean" (the mean of each image's
        spatial tokens, prefix tokens left out). Readers override it with bulk reads; this is the per-key way."""
        keys = list(self)
        for a in range(0, len(keys), block):
            part = keys[a:a + block]
            vecs = np.stack([self.pooled(k) if how == "pooled" else token_mean(self[k], self.meta(k)["num_prefix_tokens"])
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


def token_mean(x: np.ndarray, prefix: int) -> np.ndarray:
    """The mean of an entry's tokens past its prefix tokens (a video's: over all its frames' tokens)."""
    x = np.asarray(x, np.float32)
    return x[:, prefix:].mean((0, 1)) if x.ndim == 3 else x[prefix:].mean(0)


class FeatureSet(Reader):
    """An output directory read as one mapping across its completed shards (those with a done marker), as one look
    at the folder saw them (`OutputDir.snapshot`): its keys, `complete` and `broken_shards` all come from that look.
    The keys come from the markers (index.json, then the markers it lacks): no shard is opened until a key of it is
    read, and each one opened is checked to hold the keys its marker lists. Picklable (without its open files): a
    DataLoader worker gets the folder as its parent opened it."""

    def __init__(self, path: str | os.PathLike, max_open: int = 32, verify: bool = False, raw: bool = False):
        self.raw = raw
        with gc_paused():
            self._look(path, verify)
        self._open: OrderedDict[int, Reader] = OrderedDict()
        self.max_open = max_open

    def _look(self, path: str | os.PathLike, verify: bool) -> None:
        self.dir = OutputDir(path)  # local, or remote storage (its shards are downloaded to a local cache)
        self.path = self.dir.path
        self.run = self.dir.read_run(fix="pass a folder written by `s2 extract -o OUTDIR/`")
        snap = self.dir.snapshot(verify)
        self.broken = list(snap.broken)  # marked shards skipped, each with why
        self._sizes = snap.sizes
        self._markers: list[dict[str, Any]] = []
        self._where: dict[str, int] = {}
        self._shard_keys: list[list[str]] = []
        self._shadowed: list[dict[str, str]] = []  # a key already in an earlier shard: the first is kept
        for m in snap.good:
            ks = m.get("keys")
            if not (isinstance(ks, list) and len(ks) == m.get("num_images")):  # a marker written before it listed them
                try:
                    ks = shard_keys(self.dir.folder.fetch(m["shard"]))
                except (ConfigError, OSError, ValueError, KeyError) as e:
                    self.broken.append({**m, "broken": f"cannot be read: {e}"})
                    continue
                if len(ks) != m.get("num_images", len(ks)):
                    self.broken.append({**m, "broken": f"holds {len(ks)} keys where its marker recorded {m['num_images']}"})
                    continue
            self._add(m, ks)
        self._complete = snap.complete and not self.broken

    def _add(self, m: dict[str, Any], ks: list[str]) -> None:
        i = len(self._markers)
        self._markers.append(m)
        self._shard_keys.append(ks)
        for k in ks:
            if self._where.setdefault(k, i) != i:
                self._shadowed.append({"key": k, "source": m["shard"], "stage": "read", "error_class": "DuplicateKey",
                                       "error": f"key {k!r} is also in {self._markers[self._where[k]]['shard']}, "
                                                f"which comes first and is kept ({m['shard']} holds it again)"})

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_open"], state["dir"] = OrderedDict(), self.dir.folder.url  # each process opens its own files
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.dir = OutputDir(state["dir"])

    def forked(self) -> FeatureSet:
        """This look at the folder for another process (a DataLoader worker): the same keys, its own files."""
        other = copy.copy(self)
        other._open, other.dir = OrderedDict(), OutputDir(self.dir.folder.url)
        return other

    def _reader(self, i: int) -> Reader:
        if i in self._open:
            self._open.move_to_end(i)
            return self._open[i]
        m = self._markers[i]
        r = _open_file(self.dir.folder.fetch(m["shard"]), raw=self.raw)
        if list(r) != self._shard_keys[i]:  # the file there now is not the one this look saw marked
            r.close()
            raise S2Error(f"{self.path}: shard {m['shard']} holds other keys than its done marker lists (it was "
                          "replaced since the folder was opened)", fix="open the folder again to read what it holds "
                          "now; rerun the extract command to redo that shard")
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

    def scales(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        return self._shard_of(key).scales(key)

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
        """Every unit of the input was in a whole shard when the folder was opened: the manifest said so, every shard
        it lists was there and whole, and none was broken (the keys served are those of that moment)."""
        return self._complete

    @property
    def feature_shape(self) -> list[int | None] | None:
        shapes = [m["shape"] if "shape" in m else self._reader(i).feature_shape for i, m in enumerate(self._markers[:8])]
        shapes = [s for s in shapes if s is not None]
        if not shapes:
            return None
        return shapes[0] if all(s == shapes[0] for s in shapes) else [None, shapes[0][-1]]

    @property
    def dtype(self) -> str:
        if not self._markers:
            return self.run["config"].get("dtype", "float32")
        return self._markers[0]["dtype"] if "dtype" in self._markers[0] else self._reader(0).dtype

    def close(self) -> None:
        for r in self._open.values():
            r.close()
        self._open.clear()
        self.dir.folder.close()  # a remote folder's downloaded shards

    def size_bytes(self) -> int:
        return sum(self._sizes.get(m["shard"], 0) for m in self._markers)


def _open_file(path: Path, raw: bool = False) -> Reader:
    fmt = formats.of_path(path)
    if fmt is None:
        raise ConfigError("not a feature file of a known format (by its suffix)", given=str(path),
                          expected=" | ".join(formats.suffixes()), fix="pass a file or folder written by `s2 extract`")
    if not fmt.exists(path):
        writer = claim_held(path.with_name(f".{path.name}.lock"))
        if writer:  # a single file appears only when its run has written all of it
            raise ConfigError(f"{path} is being written by a run ({writer}); it appears when that run ends",
                              given=str(path), fix="wait for that run to end (a folder, -o OUTDIR/, can be read while "
                                                   "it is written)")
        raise ConfigError("no such feature file", given=str(path), fix="pass a file or folder written by `s2 extract`")
    return fmt.open(path, raw=raw)


def shard_contents(path: str | os.PathLike) -> dict[str, Any]:
    """What a done marker lists of its shard, as its reader gives it: `keys` in order, `shape` and `dtype`."""
    with _open_file(Path(path)) as r:
        return {"keys": list(r), "shape": r.feature_shape, "dtype": r.dtype}


def shard_keys(path: str | os.PathLike) -> list[str]:
    """The keys one feature file holds, in order."""
    with _open_file(Path(path)) as r:
        return list(r)


def open_features(path: str | os.PathLike, verify: bool = False, raw: bool = False, layer: int | None = None) -> Reader:
    """Open features written by `s2 extract` (below); `layer`: of an output of several layers (--layers), the one to
    read ((T, C) features, (C,) pooled vectors; None: all of them, (L, T, C) and (L, C)), by its index as --layers
    listed it."""
    return pick_layer(_open_features(path, verify, raw), layer)


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
        self.inner, self.layers, self.index, self.path, self.raw = inner, layers, index, inner.path, inner.raw

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

    def scales(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """The picked layer's token scales ((L, T) for all), and the channel scales the layers share."""
        tokens, channels = self.inner.scales(key)
        rows = self.inner[key].shape
        tokens = tokens.reshape(*rows[:-2], len(self.layers), rows[-2] // len(self.layers))
        return (tokens if self.index is None else tokens[..., self.index, :]), channels

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


def _open_features(path: str | os.PathLike, verify: bool = False, raw: bool = False) -> Reader:
    """Open features written by `s2 extract` for lazy reading by key: one output of a format (.h5, .safetensors,
    ...: `formats.names()`), or an output folder of shards (read across its completed shards; a shard whose size is not the one its marker
    recorded, or that cannot be read, is skipped and listed in `broken_shards`; `verify`: every shard's digest
    is checked too). An output folder's URL (s3://, gs://, any fsspec URL) is read from remote storage: its
    shards are downloaded to a local cache as they are needed, removed when the reader closes. `raw`: read the
    stored codes, not values (see `Reader`)."""
    if local_of(path) is None:
        if formats.of_path(str(path)) is not None:  # s2 extract writes none there either
            raise ConfigError("a single feature file on remote storage is not read in place", given=str(path),
                              fix="copy it to a local file first, or pass the URL of an output folder")
        return FeatureSet(folder(str(path)), verify=verify, raw=raw)
    p = Path(local_of(path))  # type: ignore[arg-type]
    if p.is_dir() and formats.of_path(p) is None:
        return FeatureSet(p, verify=verify, raw=raw)
    return _open_file(p, raw=raw)


def summary(ff: Reader) -> dict[str, Any]:
    """What `s2 inspect PATH` shows: the attributes every output carries (config.FILE_ATTRS), counts, failures,
    shape, dtype, size on disk, and for a folder its shards and whether the run is complete."""
    from .config import FILE_ATTRS, JSON_ATTRS  # config is above readers (it knows the backbones)

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
        report["size_bytes"] = formats.store_bytes(Path(ff.path))
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
