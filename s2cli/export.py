"""Export: one vector per image from stored features, in the layout clip-retrieval writes and autofaiss reads
(`s2 export`)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError
from .readers import Reader


def export_embeddings(src: Reader, out: str | os.PathLike, pool: str = "auto", chunk: int = 100_000) -> dict[str, Any]:
    """One vector per image, in the layout clip-retrieval writes and autofaiss reads:
    OUT/img_emb/img_emb_{i}.npy (n, C) and OUT/metadata/metadata_{i}.parquet (key, source) in the same order
    (metadata_{i}.jsonl when pyarrow is not installed). `pool`: auto (the stored pooled vectors, else the mean of
    the spatial tokens), pooled, or mean."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError("export folder is not empty", given=str(out), fix="pass a new or empty folder")
    (out / "img_emb").mkdir(parents=True, exist_ok=True)
    (out / "metadata").mkdir(parents=True, exist_ok=True)
    keys = list(src)
    if not keys:
        raise ConfigError("nothing to export: no images", given=str(src.path), fix="extract some images first")
    stored = _has_pooled(src, keys[0])
    if pool == "pooled" and not stored:
        raise ConfigError("no pooled vectors are stored", given=str(src.path), fix="use --pool mean, or extract with --pool mean|cls")
    use_stored = stored and pool in ("auto", "pooled")
    prefix = int(src.attrs.get("num_prefix_tokens", 0) or 0)
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        pa = None
    files = []
    for i, start in enumerate(range(0, len(keys), chunk)):
        part = keys[start:start + chunk]
        vecs = np.stack([src.pooled(k) if use_stored else np.asarray(src[k], np.float32)[prefix:].mean(0)
                         for k in part])
        np.save(out / "img_emb" / f"img_emb_{i}.npy", vecs)
        rows = [{"key": k, "source": src.meta(k)["source"]} for k in part]
        if pa is not None:
            pq.write_table(pa.Table.from_pylist(rows), out / "metadata" / f"metadata_{i}.parquet")
        else:
            (out / "metadata" / f"metadata_{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        files.append(f"img_emb/img_emb_{i}.npy")
    return {"output": str(out), "num_images": len(keys), "dim": int(vecs.shape[1]), "files": files,
            "pool": "stored" if use_stored else "mean"}


def _has_pooled(src: Reader, key: str) -> bool:
    try:
        src.pooled(key)
        return True
    except KeyError:
        return False
