"""Path lists: a .txt (one path per line) or a .csv/.parquet with a `path` column, every row an image."""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..store import is_url, join_url, local_of, open_url
from .kind import InputKind, InputOptions, where
from .samples import Sample, check_unique
from .units import Input


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
                with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
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
    check_unique(pairs, "list rows")
    if not pairs:
        raise ConfigError("input list is empty", given=str(path), fix="list at least one image")
    return [Sample(k, s, meta=m) for (k, s), m in zip(pairs, metas)]


def _list_text(path: str | Path) -> str:
    """A .txt/.csv list's text, local or at a URL. Bytes that are not UTF-8 (a file name in another encoding) are
    kept as Python keeps them in file names (surrogateescape), so the row names the file a folder listing finds."""
    if isinstance(path, Path):
        return path.read_bytes().decode("utf-8", "surrogateescape")
    with open_url(path) as fh:
        return fh.read().decode("utf-8", "surrogateescape")


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



class ListKind(InputKind):
    name = "list"
    takes = ("meta_columns", "keep_ext")
    nothing_read_fix = ("read the failure records (`s2 inspect OUT --json` or OUTDIR/errors.jsonl); relative paths in "
                        "a .txt list resolve against the list's folder")

    def detect(self, spec: Any, opts: InputOptions) -> bool:
        return isinstance(spec, str) and spec.lower().endswith((".txt", ".csv", ".parquet")) and where(spec)[0] == "file"

    def open(self, spec: str, opts: InputOptions) -> Input:
        return self.listed(spec, read_list(spec, opts.meta_columns, opts.keep_ext), opts)
