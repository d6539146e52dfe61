"""Export: one vector per image from stored features, in the layout clip-retrieval writes and autofaiss reads
(`s2 export`): OUT/img_emb/img_emb_{i}.npy and OUT/metadata/metadata_{i}.parquet, row for row."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import ConfigError
from .readers import Reader
from .store import local_of

POOLS = ("auto", "pooled", "mean")
EXPORT_DTYPES = ("float16", "float32")


def export_embeddings(src: Reader, out: str | os.PathLike, pool: str = "auto", normalize: bool = True,
                      dtype: str = "float16", chunk: int = 100_000, block: int = 4096) -> dict[str, Any]:
    """One vector per image, in the layout clip-retrieval writes and autofaiss reads: OUT/img_emb/img_emb_{i}.npy
    (n, C) and OUT/metadata/metadata_{i}.parquet in the same order, with the columns `image_path` (the image's
    source), `key`, and each top-level field of the images' metadata (caption, url, ...; see --meta-columns).
    `pool`: auto (the stored pooled vectors, else the mean of the spatial tokens), pooled, or mean. `normalize`:
    L2-normalise each vector (computed in float32; as clip-retrieval does, so inner product is cosine), then
    store as `dtype` (float16, as clip-retrieval, or float32). Reads in bulk, `block` images at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if pool not in POOLS:
        raise ConfigError("--pool is not known", given=pool, expected=" | ".join(POOLS), fix="pass --pool auto")
    if dtype not in EXPORT_DTYPES:
        raise ConfigError("--dtype is not known for export", given=dtype, expected=" | ".join(EXPORT_DTYPES),
                          fix="pass --dtype float16 (or float32)")
    if local_of(str(out)) is None:
        raise ConfigError("s2 export writes a local folder", given=str(out),
                          fix="export to a local folder, then copy it to the object store (aws s3 cp --recursive, gsutil cp -r)")
    out = Path(local_of(str(out)))  # type: ignore[arg-type]
    if out.exists() and any(out.iterdir()):
        raise ConfigError("export folder is not empty", given=str(out), fix="pass a new or empty folder")
    if not len(src):
        raise ConfigError("nothing to export: no images", given=str(src.path), fix="extract some images first")
    stored = _has_pooled(src, next(iter(src)))
    if pool == "pooled" and not stored:
        raise ConfigError("no pooled vectors are stored", given=str(src.path), fix="use --pool mean, or extract with --pool mean|cls")
    use_stored = stored and pool in ("auto", "pooled")
    (out / "img_emb").mkdir(parents=True, exist_ok=True)
    (out / "metadata").mkdir(parents=True, exist_ok=True)
    files, n, dim = [], 0, 0
    for i, (keys, vecs, recs) in enumerate(_chunks(src.vector_blocks("pooled" if use_stored else "mean", block), chunk)):
        if normalize:
            vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        np.save(out / "img_emb" / f"img_emb_{i}.npy", vecs.astype(dtype))
        pq.write_table(pa.Table.from_pylist(_rows(keys, recs)), out / "metadata" / f"metadata_{i}.parquet")
        files.append(f"img_emb/img_emb_{i}.npy")
        n, dim = n + len(keys), int(vecs.shape[1])
    return {"output": str(out), "num_images": n, "dim": dim, "files": files, "pool": "stored" if use_stored else "mean",
            "normalized": normalize, "dtype": dtype,
            # an output folder: what readers say of it (an unfinished run, or broken shards, exports the rest)
            "complete": getattr(src, "complete", True), "broken_shards": getattr(src, "broken_shards", [])}


def _chunks(blocks: Iterator[tuple[list[str], np.ndarray, list[dict]]], chunk: int) -> Iterator[tuple[list[str], np.ndarray, list[dict]]]:
    """The blocks regrouped into files of `chunk` images (the last one shorter)."""
    keys: list[str] = []
    vecs: list[np.ndarray] = []
    recs: list[dict] = []
    for k, v, r in blocks:
        keys += k
        vecs.append(v)
        recs += r
        while len(keys) >= chunk:
            allv = np.concatenate(vecs)
            yield keys[:chunk], allv[:chunk], recs[:chunk]
            keys, vecs, recs = keys[chunk:], [allv[chunk:]], recs[chunk:]
    if keys:
        yield keys, np.concatenate(vecs), recs


def _rows(keys: list[str], recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Parquet rows: image_path, key, and the images' metadata fields as columns (non-dict metadata as `meta`)."""
    rows = []
    for k, r in zip(keys, recs):
        row: dict[str, Any] = {"image_path": r["source"], "key": k}
        m = r["meta"]
        if isinstance(m, dict):
            row.update({c: v for c, v in m.items() if c not in row})
        elif m is not None:
            row["meta"] = m
        rows.append(row)
    return rows


def _has_pooled(src: Reader, key: str) -> bool:
    try:
        src.pooled(key)
        return True
    except KeyError:
        return False
