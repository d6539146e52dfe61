"""Export: one vector per image from stored features, in the layout clip-retrieval writes and autofaiss reads
(`s2 export`): OUT/img_emb/img_emb_{i}.npy and OUT/metadata/metadata_{i}.parquet, row for row."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .columns import Columns, flatten
from .errors import ConfigError
from .fsutil import pid_alive, write_error
from .readers import Reader
from .store import local_of

POOLS = ("auto", "pooled", "mean")
EXPORT_DTYPES = ("float16", "float32")
OWN_COLUMNS = ("image_path", "key")  # a metadata field of one of these names is the column meta.<name>


def export_embeddings(src: Reader, out: str | os.PathLike, pool: str = "auto", normalize: bool = True,
                      dtype: str = "float16", chunk: int = 100_000, block: int = 4096) -> dict[str, Any]:
    """One vector per image, in the layout clip-retrieval writes and autofaiss reads: OUT/img_emb/img_emb_{i}.npy
    (n, C) and OUT/metadata/metadata_{i}.parquet in the same order, with the columns `image_path` (the image's
    source, absolute: a relative one is joined to the folder the extraction ran in, `image_path`), `key`, and every field of every image's metadata (the union; JSON objects flattened to dotted
    columns, one type per column, mixed types as strings: the rules in columns.py). `pool`: auto (the stored
    pooled vectors, else the mean of the spatial tokens), pooled, or mean. `normalize`: L2-normalise each vector
    (computed in float32; as clip-retrieval does, so inner product is cosine), then store as `dtype` (float16, as
    clip-retrieval, or float32). Reads in bulk, `block` images at a time. Written into a temporary folder beside
    OUT and renamed to OUT at the end: a failed or killed export leaves no OUT (and a later one removes what a
    killed one left)."""
    if pool not in POOLS:
        raise ConfigError("--pool is not known", given=pool, expected=" | ".join(POOLS), fix="pass --pool auto")
    if dtype not in EXPORT_DTYPES:
        raise ConfigError("--dtype is not known for export", given=dtype, expected=" | ".join(EXPORT_DTYPES),
                          fix="pass --dtype float16 (or float32)")
    if local_of(str(out)) is None:
        raise ConfigError("s2 export writes a local folder", given=str(out),
                          fix="export to a local folder, then copy it to the object store (aws s3 cp --recursive, gsutil cp -r)")
    out = Path(local_of(str(out)))  # type: ignore[arg-type]
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError("export folder is not empty", given=str(out), fix="pass a new or empty folder")
    if not len(src):
        raise ConfigError("nothing to export: no images", given=str(src.path), fix="extract some images first")
    stored = _has_pooled(src, next(iter(src)))
    if pool == "pooled" and not stored:
        raise ConfigError("no pooled vectors are stored", given=str(src.path), fix="use --pool mean, or extract with --pool mean|cls")
    use_stored = stored and pool in ("auto", "pooled")
    _clean_leftovers(out)
    tmp = out.parent / f"{TMP_PREFIX}{out.name}-{os.getpid()}"
    try:
        # --pool embed stores [combined | each scale's] embeddings: the combined one is what a text query meets
        pieces = 1 + len(src.config.get("img_sizes", ())) if use_stored and src.config.get("pool") == "embed" else 1
        n, dim, files = _write(src, tmp, "pooled" if use_stored else "mean", normalize, dtype, chunk, block, pieces)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except OSError as e:
        raise write_error(tmp, e, fix=f"free space (or export elsewhere), then run the export again: nothing of "
                                      f"{out} was left behind") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"output": str(out), "num_images": n, "dim": dim, "files": files, "pool": "stored" if use_stored else "mean",
            "normalized": normalize, "dtype": dtype,
            # an output folder: what readers say of it (an unfinished run, or broken shards, exports the rest)
            "complete": getattr(src, "complete", True), "broken_shards": getattr(src, "broken_shards", [])}


TMP_PREFIX = ".s2cli-export-"  # + OUT's name + the writing process's id: beside OUT until it is renamed to OUT


def _clean_leftovers(out: Path) -> None:
    """Temporary folders of exports to `out` whose process is gone (killed): removed."""
    for p in out.parent.glob(f"{TMP_PREFIX}{out.name}-*") if out.parent.is_dir() else ():
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _write(src: Reader, tmp: Path, how: str, normalize: bool, dtype: str, chunk: int,
           block: int, pieces: int = 1) -> tuple[int, int, list[str]]:
    """The vectors (the first of their `pieces` equal parts) and metadata into `tmp`: each chunk's parquet with its
    own columns as it is written, then those whose columns differ from all images' together written again with
    those (the union, one type each)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp / "img_emb").mkdir(parents=True)
    (tmp / "metadata").mkdir()
    files, n, dim = [], 0, 0
    every, parts = Columns(), []
    for i, (keys, vecs, recs) in enumerate(_chunks(src.vector_blocks(how, block), chunk)):
        vecs = vecs[:, :vecs.shape[1] // pieces]
        if normalize:
            vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        np.save(tmp / "img_emb" / f"img_emb_{i}.npy", vecs.astype(dtype))
        rows = _rows(keys, recs, src.attrs.get("source_root"))
        cols = Columns().add(rows)
        every.merge(cols)
        path = tmp / "metadata" / f"metadata_{i}.parquet"
        pq.write_table(pa.Table.from_pylist(cols.cast(rows), schema=cols.arrow_schema()), path)
        parts.append((path, cols.types()))
        files.append(f"img_emb/img_emb_{i}.npy")
        n, dim = n + len(keys), int(vecs.shape[1])
    for path, types in parts:
        if types != every.types():
            rows = pq.read_table(path).to_pylist()
            pq.write_table(pa.Table.from_pylist(every.cast(rows), schema=every.arrow_schema()), path)
    return n, dim, files


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


def _rows(keys: list[str], recs: list[dict[str, Any]], root: str | None) -> list[dict[str, Any]]:
    """Parquet rows: image_path, key, and the image's metadata flattened (columns.py)."""
    return [{"image_path": image_path(r["source"], root), "key": k, **flatten(r["meta"], OWN_COLUMNS)}
            for k, r in zip(keys, recs)]


def image_path(source: str, root: str | None) -> str:
    """A source as an export writes it: a relative local path joined to `root` (the extraction's folder), so that it
    opens from anywhere; an absolute path, a URL, a `pipe:` (or a relative path with no root: an output written
    before s2cli recorded it) as stored."""
    if root is None or os.path.isabs(source) or "://" in source or source.startswith("pipe:"):
        return source
    return os.path.normpath(os.path.join(root, source))


def _has_pooled(src: Reader, key: str) -> bool:
    try:
        src.pooled(key)
        return True
    except KeyError:
        return False
