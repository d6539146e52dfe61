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

from .errors import ConfigError
from .readers import open_features


def to_hf_dataset(path: str | os.PathLike, features: bool = True, cache_dir: str | os.PathLike | None = None) -> Any:
    """The features at `path` as a `datasets.Dataset`, in input order. Columns: `key`; `features` (T, C) float32
    (Array2D, T varying for ragged outputs; bfloat16/float16 storage decoded to float32; left out with
    `features=False` or when only pooled vectors were stored); `pooled` (C,) when stored; `source`, `orig_hw`,
    `grid_hw`, `num_prefix_tokens`, `split_mode`; `plan` and `reduce` (JSON text) when written; and one string
    column per field of the first image's metadata (`meta`: caption, url, ...; values that are not strings as
    JSON), None where an image lacks it."""
    try:
        import datasets
    except ImportError:
        raise ConfigError("to_hf_dataset needs the `datasets` package", fix="pip install 's2-features[hf]'") from None
    p = Path(path)
    with open_features(p) as r:
        if not len(r):
            raise ConfigError("no images to convert", given=str(p), fix="extract some images first")
        first = next(iter(r))
        m = r.meta(first)
        shape = r.feature_shape if features else None
        pooled = _has_pooled(r, first)
        width = int(r.pooled(first).shape[0]) if pooled else None
    meta_cols = sorted(m["meta"]) if isinstance(m["meta"], dict) else []
    extra = [n for n in ("plan", "reduce") if n in m]
    cols: dict[str, Any] = {"key": datasets.Value("string")}
    if shape is not None:
        cols["features"] = datasets.Array2D(shape=(shape[0], shape[1]), dtype="float32")
    if pooled:
        cols["pooled"] = datasets.Sequence(datasets.Value("float32"), length=width)
    cols.update(source=datasets.Value("string"), orig_hw=datasets.Sequence(datasets.Value("int32"), length=2),
                grid_hw=datasets.Sequence(datasets.Value("int32"), length=2), num_prefix_tokens=datasets.Value("int32"),
                split_mode=datasets.Value("string"))
    cols.update({n: datasets.Value("string") for n in extra + [c for c in meta_cols if c not in cols]})
    return datasets.Dataset.from_generator(
        _rows, features=datasets.Features(cols), cache_dir=None if cache_dir is None else str(cache_dir),
        gen_kwargs={"path": str(p), "columns": json.dumps(list(cols)), "mtime": _mtime(p)})  # a list would be sharded


def _rows(path: str, columns: str, mtime: float) -> Iterator[dict[str, Any]]:
    """One row per image; `columns` a JSON list (`mtime` is there so that the datasets cache tells a rewritten
    output apart)."""
    cols = json.loads(columns)
    with open_features(path) as r:
        for k in r:
            m = r.meta(k)
            row: dict[str, Any] = {"key": k}
            if "features" in cols:
                row["features"] = r[k]
            if "pooled" in cols:
                row["pooled"] = r.pooled(k)
            user = m.get("meta") if isinstance(m.get("meta"), dict) else {}
            for c in cols:
                if c in row:
                    continue
                v = m[c] if c in m else user.get(c)
                plain = c in ("orig_hw", "grid_hw", "num_prefix_tokens") or v is None or isinstance(v, str)
                row[c] = v if plain else json.dumps(v)
            yield row


def _mtime(p: Path) -> float:
    files = [p] if p.is_file() else list(p.iterdir())
    return max(f.stat().st_mtime for f in files)


def _has_pooled(r: Any, key: str) -> bool:
    try:
        r.pooled(key)
        return True
    except KeyError:
        return False
