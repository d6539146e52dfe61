"""Listing folders and path lists (.txt, .csv, .parquet) into keyed samples; key clashes refused before any work."""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..store import filesystem, is_url, join_url, local_of, open_url
from ..video import VIDEO_EXTS
from .samples import IMAGE_EXTS, Sample

COMPRESSED_TARS = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


def _check_unique(pairs: list[tuple[str, str]], what: str) -> None:
    by_key: dict[str, list[str]] = {}
    for key, src in pairs:
        by_key.setdefault(key, []).append(src)
    clashes = {k: v for k, v in by_key.items() if len(v) > 1}
    if clashes:
        shown = "; ".join(f"{k}: {', '.join(Path(p).name for p in v)}" for k, v in list(clashes.items())[:5])
        more = f" (and {len(clashes) - 5} more)" if len(clashes) > 5 else ""
        raise ConfigError(f"{len(clashes)} keys are shared by several {what}: {shown}{more}",
                          expected="one file per key", fix="rename or remove one file of each pair")


def scan_folder(root: str | os.PathLike, keep_ext: bool = False) -> list[Sample]:
    """Every image and video (VIDEO_EXTS) under `root` (recursive, any-case extensions), sorted by relative path;
    its key is that path without the extension (with it: `keep_ext`), and `key.json` / `key.txt` beside it are its
    metadata. Two files with the same key (`a.jpg`, `a.png`) are an error listing all such pairs, raised before any
    work starts."""
    found = _walk(str(root)) if local_of(str(root)) is None else _walk_local(Path(local_of(root)))  # type: ignore[arg-type]
    found.sort()
    pairs = [(rel if keep_ext else rel.rsplit(".", 1)[0], full) for rel, full, _ in found]
    _check_unique(pairs, "files (the path without its extension)")
    if not pairs:
        local = local_of(str(root))
        tars = sorted(p.name for p in Path(local).iterdir() if p.name.lower().endswith(COMPRESSED_TARS)) if local else []
        if tars:  # a folder names its plain .tar shards only; compressed ones are read through a glob
            ext = next(e for e in COMPRESSED_TARS if tars[0].lower().endswith(e))
            raise ConfigError(f"input folder holds no images or videos but {len(tars)} compressed WebDataset shards "
                              f"(e.g. {tars[0]}), and a folder is read as shards only when it holds plain .tar files",
                              given=str(root), fix=f"pass them as a glob: '{root}/*{ext}' (quoted)")
        raise ConfigError("input folder holds no images or videos", given=str(root),
                          expected="files ending in " + ", ".join(IMAGE_EXTS + VIDEO_EXTS),
                          fix="point at a folder with images or videos")
    return [Sample(k, s, sidecars=side) for (k, s), (_, _, side) in zip(pairs, found)]


def _walk_local(root: Path) -> list[tuple[str, str, tuple[str, ...]]]:
    """(relative path, path, sidecars) of every image and video under a local folder."""
    if not root.exists():
        raise ConfigError("input does not exist", given=str(root), fix="pass an existing folder, list or shards")
    if not root.is_dir():
        raise ConfigError("input is not a folder", given=str(root), fix="pass a folder of images (read recursively)")
    found: list[tuple[str, str, tuple[str, ...]]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        names = set(filenames)
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTS + VIDEO_EXTS) and not name.startswith("."):
                full = os.path.join(dirpath, name)
                stem = name.rsplit(".", 1)[0]
                sidecars = tuple(os.path.join(dirpath, f"{stem}{ext}") for ext in (".json", ".txt")
                                 if f"{stem}{ext}" in names)
                found.append((Path(full).relative_to(root).as_posix(), full, sidecars))
    return found


def _walk(url: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """(relative path, URL, sidecar URLs) of every image and video under a folder on remote storage, as `_walk_local`
    finds them in a local one (the keys are the same relative paths)."""
    fs, root = filesystem(url)
    root = root.rstrip("/")
    fs.invalidate_cache()
    if not fs.isdir(root):
        what = "input is not a folder" if fs.exists(root) else "input does not exist"
        raise ConfigError(what, given=url, fix="pass an existing folder, list or shards")
    paths = set(fs.find(root))
    found: list[tuple[str, str, tuple[str, ...]]] = []
    for full in paths:
        name = full.rsplit("/", 1)[-1]
        if name.lower().endswith(IMAGE_EXTS + VIDEO_EXTS) and not name.startswith("."):
            stem = full.rsplit(".", 1)[0]
            sidecars = tuple(fs.unstrip_protocol(f"{stem}{ext}") for ext in (".json", ".txt") if f"{stem}{ext}" in paths)
            found.append((full[len(root) + 1:], fs.unstrip_protocol(full), sidecars))
    return found


def read_list(path: str | os.PathLike, meta_columns: str = "all", keep_ext: bool = False) -> list[Sample]:
    """A .txt (one path per line), or a .csv/.parquet with a `path` column and an optional `key` column.
    Relative paths resolve against the list's folder; the default key is the path as written, less its extension
    (with it: `keep_ext`). The other columns (`meta_columns`: all, none, or a comma-separated list) are each
    image's metadata."""
    remote = local_of(str(path)) is None  # a list on remote storage: relative rows resolve against its URL
    url = str(path)
    path = Path(local_of(path) or url.rsplit("/", 1)[-1])  # type: ignore[arg-type]
    base = path.parent
    suffix = path.suffix.lower()
    rows: list[tuple[str, str | None]] = []
    metas: list[str | None] = []
    if suffix == ".txt":
        for line in _list_text(url if remote else path).splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                rows.append((line.strip(), None))
                metas.append(None)
    elif suffix in (".csv", ".parquet"):
        if suffix == ".csv":
            if remote:
                table = list(csv.DictReader(io.StringIO(_list_text(url), newline="")))
            else:
                with open(path, newline="") as fh:
                    table = list(csv.DictReader(fh))
            cols = set(table[0]) if table else set()
        else:
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise ConfigError("reading .parquet lists needs pyarrow", given=str(path), fix="pip install pyarrow") from None
            t = pq.read_table(open_url(url) if remote else path)
            cols = set(t.column_names)
            table = t.to_pylist()
        if "path" not in cols:
            raise ConfigError("list has no `path` column", given=sorted(cols), fix="name the image path column `path`")
        rows = [(str(r["path"]), (str(r["key"]) if r.get("key") not in (None, "") else None)) for r in table]
        keep = _meta_columns(meta_columns, [c for c in (table[0] if table else {}) if c not in ("path", "key")], path)
        metas = [json.dumps({c: _plain_value(r.get(c)) for c in keep}, default=str) if keep else None for r in table]
    else:
        raise ConfigError("unknown list format", given=str(path), expected=".txt, .csv or .parquet",
                          fix="pass --input-format to say what the input is")
    pairs = []
    for p, key in rows:
        full = p if os.path.isabs(p) or is_url(p) else join_url(url.rsplit("/", 1)[0], p) if remote else str(base / p)
        stem = p if keep_ext or "." not in Path(p).name else p.rsplit(".", 1)[0]
        pairs.append((key if key is not None else stem, full))
    _check_unique(pairs, "list rows")
    if not pairs:
        raise ConfigError("input list is empty", given=str(path), fix="list at least one image")
    return [Sample(k, s, meta=m) for (k, s), m in zip(pairs, metas)]


def _list_text(path: str | Path) -> str:
    """A .txt/.csv list's text, local or at a URL."""
    if isinstance(path, Path):
        return path.read_text()
    with open_url(path) as fh:
        return fh.read().decode()


def _meta_columns(spec: str, columns: list[str], path: Path) -> list[str]:
    """The extra columns a list's images keep as metadata: all, none, or the ones named (each must exist)."""
    if spec == "all":
        return columns
    if spec == "none":
        return []
    named = [c.strip() for c in spec.split(",") if c.strip()]
    missing = [c for c in named if c not in columns]
    if missing:
        raise ConfigError("--meta-columns names columns the list does not have", given=missing,
                          expected="all | none | some of " + ", ".join(columns or ["(no extra columns)"]),
                          fix=f"check the columns of {path}")
    return named


def _plain_value(v: Any) -> Any:
    """A list cell as JSON: numbers, strings, booleans and None as they are; NaN (an empty parquet cell) as None."""
    return None if isinstance(v, float) and v != v else v

