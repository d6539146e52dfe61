"""Tables with images in a column: .parquet files (a file, a folder or a glob of them; img2dataset's layout),
Arrow folders written by `datasets`' `save_to_disk`, and `hf://datasets/ORG/NAME[@REVISION]` (its .parquet files
downloaded by huggingface_hub into the HF cache, as model weights are: a rerun or resume reads them from there). The image column holds bytes, a path, or an HF `Image` struct {bytes, path}; every other column is kept
as metadata. Units are row groups (an Arrow file: the file), identified by the file's size and modification time
(or its hub blob id), read a batch at a time: memory stays flat whatever the file's size."""
from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Any, Iterator

from ..errors import ConfigError
from ..store import filesystem, local_of
from .kind import InputKind, InputOptions, where
from .lists import _meta_columns, _plain_value
from .samples import IMAGE_EXTS, Sample
from .units import Input, Unit

IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img")  # tried in order when --image-column is not given
KEY_COLUMNS = ("key", "__key__")
BATCH_ROWS = 64  # rows read at a time from a row group: the window that bounds memory
TABLE_EXTS = (".parquet", ".arrow")


class TableKind(InputKind):
    name = "table"
    streamed = True
    takes = ("meta_columns", "image_column", "key_column")

    def detect(self, spec: Any, opts: InputOptions) -> bool:
        if not isinstance(spec, str) or spec.startswith("pipe:"):
            return False
        if spec.startswith("hf://datasets/"):
            return True
        if glob.has_magic(spec) and "://" not in spec:
            found = glob.glob(spec, recursive=True)
            return bool(found) and all(p.lower().endswith(TABLE_EXTS) for p in found)
        what, names = where(spec)
        if what == "file":
            if spec.lower().endswith(".arrow"):
                return True
            return spec.lower().endswith(".parquet") and (opts.image_column is not None or "path" not in _schema_names(spec))
        if what == "dir":
            if "state.json" in names and any(n.endswith(".arrow") for n in names):
                return True
            return (any(n.endswith(".parquet") for n in names) and not any(n.endswith(".tar") for n in names)
                    and not any(n.lower().endswith(IMAGE_EXTS) for n in names))
        return False

    def open(self, spec: str, opts: InputOptions) -> Input:
        files = table_files(spec)
        cols = _pick_columns(files[0], opts)
        units: list[Unit] = []
        first = 0
        for path in files:
            for group, rows in _pieces(path):
                name = path.rsplit("/", 1)[-1]
                uid = f"{name}#rg{group}" if group is not None else name
                units.append(Unit(len(units), uid, url=path, kind=self, ref=(group, first, cols), rows=rows))
                first += rows
        total = first if not opts.limit else min(first, opts.limit)
        return self.input(spec, units, total, limit=opts.limit or None)

    def read(self, unit: Unit) -> Iterator[Sample | dict[str, str]]:
        group, row, cols = unit.ref
        for batch in _batches(unit.url, group):  # type: ignore[arg-type]
            for item in batch.to_pylist():
                yield row_sample(item, row, unit.url, cols)  # type: ignore[arg-type]
                row += 1

    def identity(self, unit: Unit) -> dict[str, Any] | None:
        """The file's size and modification time (a hub file: its blob id), and the row group's number."""
        group = unit.ref[0]
        local = local_of(unit.url)  # type: ignore[arg-type]
        if local is not None:
            try:
                st = os.stat(local)
            except OSError:
                return None
            return {"table_bytes": st.st_size, "table_mtime_ns": st.st_mtime_ns, "row_group": group}
        fs, path = filesystem(unit.url)  # type: ignore[arg-type]
        try:
            info = fs.info(path)
        except (OSError, ValueError):
            return None
        tag = info.get("blob_id") or info.get("ETag") or info.get("etag") or info.get("mtime")
        return {"table_bytes": info.get("size"), "table_etag": str(tag), "row_group": group}


def _pick_columns(path: str, opts: InputOptions) -> dict[str, Any]:
    """The image column (--image-column, else the first of IMAGE_COLUMNS), the key column (--key-column, else
    `key`/`__key__` if present; else keys are row numbers), and the columns kept as metadata."""
    columns = _columns(path)
    image = opts.image_column or next((c for c in IMAGE_COLUMNS if c in columns), None)
    if image is None or image not in columns:
        raise ConfigError("the table has no image column" if image is None else f"the table has no column {image!r}",
                          given=f"{path} (columns: {', '.join(columns)})",
                          expected="a column of image bytes, paths, or HF Image structs {bytes, path}",
                          fix="name it with --image-column COLUMN")
    key = opts.key_column or next((c for c in KEY_COLUMNS if c in columns), None)
    if key is not None and key not in columns:
        raise ConfigError(f"the table has no column {key!r}", given=f"{path} (columns: {', '.join(columns)})",
                          fix="name the key column with --key-column, or drop it (keys are then row numbers)")
    meta = _meta_columns(opts.meta_columns, [c for c in columns if c not in (image, key)], Path(path))
    return {"image": image, "key": key, "meta": meta}


def row_sample(item: dict[str, Any], row: int, url: str, cols: dict[str, Any]) -> Sample | dict[str, str]:
    """One row -> a Sample (its image's bytes, or the path it names), or a failure record for a row without one."""
    key = str(item[cols["key"]]) if cols["key"] and item.get(cols["key"]) not in (None, "") else f"{row:08d}"
    cell = item.get(cols["image"])
    meta = {c: _cell(item.get(c)) for c in cols["meta"]}
    meta_text = json.dumps(meta, default=str) if meta else None
    where_ = f"{url}#{row}"
    if isinstance(cell, dict):  # an HF Image struct
        cell = cell.get("bytes") if cell.get("bytes") is not None else cell.get("path")
    if isinstance(cell, (bytes, bytearray)):
        return Sample(key, where_, data=bytes(cell), meta=meta_text)
    if isinstance(cell, str) and cell:
        local = local_of(url)
        path = cell if os.path.isabs(cell) or "://" in cell or local is None else os.path.join(os.path.dirname(local), cell)
        return Sample(key, path, meta=meta_text)
    return {"key": key, "source": where_, "stage": "read", "error_class": "MissingImage",
            "error": f"row {row} has no image in column {cols['image']!r} (it holds {type(cell).__name__})"}


def _cell(v: Any) -> Any:
    """A metadata cell as JSON: bytes say their length (not copied into every record), structs recursively."""
    if isinstance(v, (bytes, bytearray)):
        return f"<{len(v)} bytes>"
    if isinstance(v, dict):
        return {k: _cell(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_cell(x) for x in v]
    return _plain_value(v)


def table_files(spec: str) -> list[str]:
    """The table files of an input, in order: a file; a folder's .parquet files (or its save_to_disk Arrow files, in
    state.json's order); a glob; every .parquet file of a hub dataset."""
    if spec.startswith("hf://"):
        folder = hub_dataset(spec)
        files = sorted(str(p) for p in folder.rglob("*.parquet"))
        if not files:
            raise ConfigError("the hub dataset holds no .parquet files", given=spec,
                              fix="pass a dataset repo with parquet data (or its parquet conversion)")
        return files
    if glob.has_magic(spec):
        return sorted(p for p in glob.glob(spec, recursive=True) if p.lower().endswith(TABLE_EXTS))
    p = Path(spec)
    if p.is_file():
        return [spec]
    state = p / "state.json"
    if state.exists():
        return [str(p / f["filename"]) for f in json.loads(state.read_text()).get("_data_files", [])]
    files = sorted(str(x) for x in p.rglob("*.parquet"))
    if not files:
        raise ConfigError("the folder holds no .parquet files", given=spec, fix="pass a folder of .parquet files")
    return files


def hub_dataset(spec: str) -> Path:
    """The local snapshot (in the HF cache) of a hub dataset's .parquet files: downloaded on first use, read from
    the cache after (and offline, HF_HUB_OFFLINE=1)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, _, revision = spec.removeprefix("hf://datasets/").strip("/").partition("@")
    # read from the environment now, as hub.py does for weights (huggingface_hub reads it once, at its import)
    env = os.environ.get
    home = env("HF_HOME") or os.path.join(env("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    cache = os.path.expanduser(env("HF_HUB_CACHE") or env("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub"))
    offline = any(env(k, "").upper() in ("1", "ON", "YES", "TRUE") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    try:
        return Path(snapshot_download(repo, repo_type="dataset", revision=revision or None, cache_dir=cache,
                                      endpoint=env("HF_ENDPOINT") or None, local_files_only=offline,
                                      allow_patterns=["*.parquet", "**/*.parquet"]))
    except RepositoryNotFoundError:
        raise ConfigError("no such dataset on the hub (or it is private)", given=spec,
                          fix="check ORG/NAME; log in (hf auth login) for a private one") from None
    except RevisionNotFoundError:
        raise ConfigError("the hub dataset has no such revision", given=spec, fix="check the @REVISION") from None
    except LocalEntryNotFoundError:
        raise ConfigError("the hub dataset is not in the HF cache and the hub cannot be reached (offline?)",
                          given=spec, fix="run once with the hub reachable, or unset HF_HUB_OFFLINE") from None
    except HfHubHTTPError as e:
        raise ConfigError(f"the hub refused the dataset: {str(e).splitlines()[0]}", given=spec,
                          fix="check the URL and your access") from None


def _open(path: str) -> Any:
    local = local_of(path)
    if local is not None:
        return local
    fs, inner = filesystem(path)
    return fs.open(inner, "rb")


def _pieces(path: str) -> list[tuple[int | None, int]]:
    """(row group, rows) of a parquet file; [(None, rows)] for an Arrow file."""
    if path.endswith(".arrow"):
        return [(None, _arrow(path).num_rows)]
    import pyarrow.parquet as pq

    md = pq.ParquetFile(_open(path)).metadata
    return [(g, md.row_group(g).num_rows) for g in range(md.num_row_groups)]


def _columns(path: str) -> list[str]:
    if path.endswith(".arrow"):
        return list(_arrow(path).schema.names)
    import pyarrow.parquet as pq

    return list(pq.ParquetFile(_open(path)).schema_arrow.names)


def _schema_names(path: str) -> list[str]:
    try:
        return _columns(path)
    except Exception:  # not a parquet file: the list reader says why
        return ["path"]


def _arrow(path: str) -> Any:
    """An Arrow file (stream or file format, as `save_to_disk` writes), memory-mapped: no copy is read."""
    import pyarrow as pa

    src = pa.memory_map(local_of(path) or path)
    try:
        return pa.ipc.open_stream(src).read_all()
    except pa.ArrowInvalid:
        return pa.ipc.open_file(src).read_all()


def _batches(path: str, group: int | None) -> Iterator[Any]:
    """A row group's (an Arrow file's) rows, BATCH_ROWS at a time."""
    if group is None:
        yield from _arrow(path).to_batches(max_chunksize=BATCH_ROWS)
        return
    import pyarrow.parquet as pq

    yield from pq.ParquetFile(_open(path)).iter_batches(batch_size=BATCH_ROWS, row_groups=[group])
