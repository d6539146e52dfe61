"""Hugging Face `datasets`: any output of `s2 extract` (a file or an output folder, fixed or ragged token counts,
HDF5 or safetensors) as one `datasets.Dataset`, one row per image, with its metadata as columns.

    pip install 's2-features[hf]'
    >>> ds = s2cli.to_hf_dataset("feats/")          # columns: key, features, pooled?, source, orig_hw, ...
    >>> ds.with_format("torch")[0]["features"]        # (T, C)

Rows are written by `Dataset.from_generator` into the datasets cache (or `cache_dir`), so an output larger than
memory converts; the features are read back memory-mapped from there."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .columns import Columns, flatten
from .dtypes import QUANTIZED
from .errors import ConfigError
from .items import ATTRS, Attr
from .readers import open_features
from .store import local_of


def _hf_type(datasets: Any, a: Attr, num_scales: int) -> Any:
    """The `datasets` feature type of a per-image attribute's column (JSON as text)."""
    if a.kind != "int":
        return datasets.Value("string")
    t = datasets.Value("int32")
    for d in reversed(a.shape_for(num_scales)):
        t = datasets.Sequence(t, length=d)
    return t


def to_hf_dataset(path: str | os.PathLike, features: bool = True, cache_dir: str | os.PathLike | None = None,
                  raw: bool = False, layer: int | None = None) -> Any:
    """The features at `path` (a file or a folder, local or a URL as `open_features` reads it) as a
    `datasets.Dataset`, in input order. Columns: `key`; `features` (T, C) float32 (Array2D, T varying for ragged
    outputs; bfloat16/float16 storage decoded to float32, int8/float8 dequantized; left out with `features=False`
    or when only pooled vectors were stored); `pooled` (C,) when stored; one column per per-image attribute
    (`items.ATTRS`: source, orig_hw, grid_hw, img_sizes, num_prefix_tokens, split_mode; plan and reduce (JSON
    text) and frames when written); and one column per field of any image's metadata (`meta`: caption, url, ...;
    the union over all images, JSON objects flattened to dotted columns, one type per column, mixed types as
    strings: the rules in columns.py), None where an image lacks it. `raw`: the stored codes instead (int8,
    float8/bfloat16 bits), with int8/float8 `token_scales` and `channel_scales` columns. An output of several
    layers (--layers): `layer` picks one, as `open_features` does; None: all, `features` (L, T, C) (Array3D; T
    fixed) and `pooled` (L, C)."""
    try:
        import datasets
    except ImportError:
        raise ConfigError("to_hf_dataset needs the `datasets` package", fix="pip install 's2-features[hf]'") from None
    where = str(local_of(path) or path)  # a URL stays a URL (Path would make s3://b/run the local s3:/b/run)
    with open_features(where, raw=raw, layer=layer) as r:
        if not len(r):
            raise ConfigError("no images to convert", given=where, fix="extract some images first")
        first = next(iter(r))
        m = r.meta(first)
        shape = r.feature_shape if features else None
        pooled = _has_pooled(r, first)
        width = tuple(r.pooled(first).shape) if pooled else None
        codes = r[first].dtype if shape is not None and raw else np.dtype(np.float32)
        scaled = raw and shape is not None and r.dtype in QUANTIZED
        attrs = [a for a in ATTRS if a.name != "meta" and (not a.sparse or a.name in m)]
        own = ("key", "features", "pooled", "token_scales", "channel_scales", *(a.name for a in attrs))
        meta_cols = Columns().add([flatten(r.meta(k)["meta"], own) for k in r])  # every image's fields
        stamp = _stamp(where, r)
    cols: dict[str, Any] = {"key": datasets.Value("string")}
    if shape is not None and len(shape) == 3:  # every layer (--layers): one token count for all images
        if shape[1] is None:
            raise ConfigError("the images' token counts differ, and a row holds every layer with them", given=where,
                              fix="pick one layer: to_hf_dataset(path, layer=-1)")
        cols["features"] = datasets.Array3D(shape=tuple(shape), dtype=str(codes))
    elif shape is not None:
        cols["features"] = datasets.Array2D(shape=(shape[0], shape[1]), dtype=str(codes))
    if scaled:
        cols.update(token_scales=datasets.Sequence(datasets.Value("float32")),
                    channel_scales=datasets.Sequence(datasets.Value("float32"), length=shape[-1]))  # type: ignore[index]
    if width is not None:
        cols["pooled"] = (datasets.Sequence(datasets.Value("float32"), length=width[0]) if len(width) == 1
                          else datasets.Array2D(shape=width, dtype="float32"))
    cols.update({a.name: _hf_type(datasets, a, len(m["img_sizes"])) for a in attrs})
    arrow = {"bool": "bool", "int": "int64", "float": "float64", "string": "string"}
    cols.update({n: datasets.Value(arrow[t]) for n, t in meta_cols.types().items()})
    return datasets.Dataset.from_generator(
        _rows, features=datasets.Features(cols), cache_dir=None if cache_dir is None else str(cache_dir),
        gen_kwargs={"path": where, "columns": json.dumps(list(cols)), "meta_types": json.dumps(meta_cols.types()),
                    "stamp": stamp, "raw": raw, "layer": layer})  # a list would be sharded


def _rows(path: str, columns: str, meta_types: str, stamp: str, raw: bool = False,
          layer: int | None = None) -> Iterator[dict[str, Any]]:
    """One row per image; `columns` a JSON list, `meta_types` the metadata columns' types (`stamp` is there so
    that the datasets cache tells a rewritten output apart)."""
    cols = json.loads(columns)
    meta_cols = Columns()
    meta_cols.kinds = {n: {t} for n, t in json.loads(meta_types).items()}
    own = tuple(c for c in cols if c not in meta_cols.kinds)
    with open_features(path, raw=raw, layer=layer) as r:
        for k in r:
            m = r.meta(k)
            row: dict[str, Any] = {"key": k}
            if "features" in cols:
                row["features"] = r[k]
            if "token_scales" in cols:
                tokens, row["channel_scales"] = r.scales(k)
                row["token_scales"] = tokens.reshape(-1)  # every layer's (--layers), one after the other
            if "pooled" in cols:
                row["pooled"] = r.pooled(k)
            for a in ATTRS:
                if a.name in cols and a.name != "meta":
                    v = m.get(a.name)
                    row[a.name] = json.dumps(v) if a.kind == "json" and v is not None else v
            row.update(meta_cols.cast([flatten(m.get("meta"), own)])[0])
            yield row


def _stamp(where: str, r: Any) -> str:
    """What changes when the output is rewritten: a local output's newest file time; a remote folder's shards
    (their markers: names, sizes, store identities)."""
    local = local_of(where)
    if local is not None:
        p = Path(local)
        files = [p] if p.is_file() else list(p.iterdir())
        return str(max(f.stat().st_mtime for f in files))
    import hashlib

    return hashlib.sha256(json.dumps(getattr(r, "shards", None), sort_keys=True, default=str).encode()).hexdigest()


def _has_pooled(r: Any, key: str) -> bool:
    try:
        r.pooled(key)
        return True
    except KeyError:
        return False
