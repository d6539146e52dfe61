"""Tables with images in a column: .parquet files (a file, a folder or a glob of them; img2dataset's layout),
Arrow folders written by `datasets`' `save_to_disk`, and `hf://datasets/ORG/NAME[@REVISION]` (listed through
huggingface_hub's file system, each file downloaded into the HF cache when first read: `hubdata.py`). The image
column holds bytes, a path, or an HF `Image` struct {bytes, path}; every other column is kept as metadata. Units
are row groups (an Arrow file: the file), identified by the file's size and modification time (a hub file: its
size and content id), read a batch at a time: memory stays flat whatever the file's size."""
from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Any, Iterator

from ..errors import ConfigError
from ..store import filesystem, is_url, join_url, local_of
from .hubdata import PREFIX, HubFile, list_files
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
        if spec.startswith(PREFIX):
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
        for src in files:
            for group, rows in _pieces(src):
                name = src.path if isinstance(src, HubFile) else src.rsplit("/", 1)[-1]
                uid = f"{name}#rg{group}" if group is not None else name
                url = src.url if isinstance(src, HubFile) else src
                units.append(Unit(len(units), uid, url=url, kind=self, ref=(group, first, cols, src), rows=rows))
                first += rows
        total = first if not opts.limit else min(first, opts.limit)
        return self.input(spec, units, total, limit=opts.limit or None)

    def read(self, unit: Unit) -> Iterator[Sample | dict[str, str]]:
        group, row, cols, src = unit.ref
        for batch in _batches(src, group):
            for item in batch.to_pylist():
                yield row_sample(item, row, unit.url, cols)  # type: ignore[arg-type]
                row += 1

    def fetch_ahead(self, unit: Unit) -> None:
        if isinstance(unit.ref[3], HubFile):
            unit.ref[3].fetch()

    def identity(self, unit: Unit) -> dict[str, Any] | None:
        """The file's size and modification time (a hub file: its content id), and the row group's number."""
        group, src = unit.ref[0], unit.ref[3]
        if isinstance(src, HubFile):
            return {"table_bytes": src.size, "table_etag": src.etag, "row_group": group}
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


def _pick_columns(src: str | HubFile, opts: InputOptions) -> dict[str, Any]:
    """The image column (--image-column, else the first of IMAGE_COLUMNS), the key column (--key-column, else
    `key`/`__key__` if present; else keys are row numbers), and the columns kept as metadata."""
    columns = _columns(src)
    path = src.url if isinstance(src, HubFile) else src
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
        return Sample(key, beside(url, cell), meta=meta_text)
    return {"key": key, "source": where_, "stage": "read", "error_class": "MissingImage",
            "error": f"row {row} has no image in column {cols['image']!r} (it holds {type(cell).__name__})"}


def beside(url: str, cell: str) -> str:
    """The image a table's path cell names: an absolute path or a URL as it is; a relative path from the table's
    folder, a local one's or the table URL's (an s3:// or hf:// table's images are read from beside it, as a remote
    list's rows are), never from the folder the run happens to start in."""
    if os.path.isabs(cell) or is_url(cell):
        return cell
    local = local_of(url)
    if local is not None:
        return os.path.join(os.path.dirname(local), cell)
    return join_url(url.rsplit("/", 1)[0], cell)


def _cell(v: Any) -> Any:
    """A metadata cell as JSON: bytes say their length (not copied into every record), structs recursively."""
    if isinstance(v, (bytes, bytearray)):
        return f"<{len(v)} bytes>"
    if isinstance(v, dict):
        return {k: _cell(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_cell(x) for x in v]
    return _plain_value(v)


def table_files(spec: str) -> list[str | HubFile]:
    """The table files of an input, in order: a file; a folder's .parquet files (or its save_to_disk Arrow files, in
    state.json's order), locally or at a URL; a glob; every .parquet file of a hub dataset."""
    if spec.startswith(PREFIX):
        return list(list_files(spec))
    if local_of(spec) is None:  # a table file, or a folder of .parquet files, on remote storage (s3://, gs://, ...)
        return _remote_files(spec)
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
    return list(files)


def _remote_files(spec: str) -> list[str]:
    fs, path = filesystem(spec)
    if fs.isfile(path):
        return [spec]
    found = fs.find(path)
    files = sorted(fs.unstrip_protocol(p) for p in found if p.lower().endswith(".parquet"))
    if not files and any(p.lower().endswith(".arrow") for p in found):
        raise ConfigError("an Arrow folder (datasets' save_to_disk) is read from a local folder only", given=spec,
                          fix="copy it to a local folder first, or save the dataset as .parquet files there")
    if not files:
        raise ConfigError("the folder holds no .parquet files", given=spec, fix="pass a folder of .parquet files")
    return files


def _open(path: str | HubFile) -> Any:
    """What pyarrow reads a file's footer from: a local path, a hub file (cached, else by range requests), a URL."""
    if isinstance(path, HubFile):
        return path.open()
    local = local_of(path)
    if local is not None:
        return local
    fs, inner = filesystem(path)
    return fs.open(inner, "rb")


def _pieces(path: str | HubFile) -> list[tuple[int | None, int]]:
    """(row group, rows) of a parquet file; [(None, rows)] for an Arrow file."""
    if isinstance(path, str) and path.endswith(".arrow"):
        return [(None, _arrow(path).num_rows)]
    import pyarrow.parquet as pq

    md = pq.ParquetFile(_open(path)).metadata
    return [(g, md.row_group(g).num_rows) for g in range(md.num_row_groups)]


def _columns(path: str | HubFile) -> list[str]:
    if isinstance(path, str) and path.endswith(".arrow"):
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


def _batches(path: str | HubFile, group: int | None) -> Iterator[Any]:
    """A row group's (an Arrow file's) rows, BATCH_ROWS at a time; a hub file's from the HF cache (downloaded
    first if it is not there yet)."""
    if isinstance(path, HubFile):
        path = path.fetch()
    if group is None:
        yield from _arrow(path).to_batches(max_chunksize=BATCH_ROWS)
        return
    import pyarrow.parquet as pq

    yield from pq.ParquetFile(_open(path)).iter_batches(batch_size=BATCH_ROWS, row_groups=[group])
