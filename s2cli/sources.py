"""Sources: turn an input (a folder, a file list, WebDataset shards) into units of keyed samples, then decode
and fit each image in worker processes. A bad sample becomes a failure record, never a crash, a hang, or a
shifted key."""
from __future__ import annotations

import csv
import glob
import io
import json
import multiprocessing as mp
import os
import signal
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ConfigError
from .store import filesystem, is_url, join_url, local_of, open_url
from .video import VIDEO_EXTS, VIDEO_MEMBERS, Sampling, header, looks_like_video, read_clip, require_av


def printable(text: str) -> str:
    """A file name's bytes that are not UTF-8 (kept by Python as lone surrogates) spelled as `\\xNN`, so keys
    and sources can be stored and printed; stable, so the same file always gets the same key."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
FITS = ("crop", "squash", "pad", "keep")
DECODES = ("pil", "torch")
INPUT_FORMATS = ("auto", "folder", "list", "wds")
DEFAULT_IMAGE_KEY = "jpg;jpeg;png;webp"


@dataclass(frozen=True)
class Sample:
    key: str  # folder: path relative to the input without extension; list: `key` column; wds: __key__
    source: str  # where the bytes come from (a path, or "<tar url>#<key>")
    data: bytes | None = None  # the image bytes, when they come from a stream (wds); else read from `source`
    meta: str | None = None  # per-image metadata as JSON text (wds json/txt members, a list's extra columns)
    sidecars: tuple[str, ...] = ()  # `key.json` / `key.txt` beside a folder's image, read when it is decoded

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", printable(self.key))  # `source` stays the real path, for reading


def sample_meta(sample: Sample) -> str | None:
    """The sample's metadata as JSON text: its own, and its sidecar files read as a WebDataset sample's `json` and
    `txt` members are (`{"json": ..., "txt": ...}`)."""
    if not sample.sidecars:
        return sample.meta
    meta: dict[str, Any] = json.loads(sample.meta) if sample.meta else {}
    for path in sample.sidecars:
        with open_url(path) as fh:
            raw = fh.read()
        if path.endswith(".json"):
            try:
                meta["json"] = json.loads(raw)
            except ValueError:
                meta["json"] = raw.decode("utf-8", "replace")
        else:
            meta["txt"] = raw.decode("utf-8", "replace")
    return json.dumps(meta) if meta else None


@dataclass
class Unit:
    """One unit of work: a slice of a folder or list, or one input tar. Units are numbered in input order and
    do not depend on who processes them; each is cut into parts of at most `shard_size` samples."""

    index: int
    id: str
    _samples: list[Sample] | None = None
    url: str | None = None  # wds
    image_key: str = DEFAULT_IMAGE_KEY

    @property
    def size(self) -> int | None:
        return None if self._samples is None else len(self._samples)

    def part_keys(self, part: int, shard_size: int) -> list[str] | None:
        """The keys of one part of a listed unit, in order ([] past its end); None for a tar (known once read)."""
        if self._samples is None:
            return None
        return [s.key for s in self._samples[part * shard_size:(part + 1) * shard_size]]

    def identity(self) -> dict[str, int] | None:
        """What tells a tar's content apart without reading it: its size and modification time (a local file);
        None for a listed unit (its keys say it) and for a tar that cannot be stat'ed (pipe:, a URL)."""
        if self.url is None or self.url.startswith("pipe:"):
            return None
        try:
            st = os.stat(self.url)
        except OSError:
            return None
        return {"tar_bytes": st.st_size, "tar_mtime_ns": st.st_mtime_ns}

    def samples(self) -> Iterator[Sample | dict[str, str]]:
        """Samples in order; a dict instead of a Sample is a failure record (unreadable tar, missing image)."""
        if self._samples is not None:
            yield from self._samples
            return
        yield from _tar_samples(self.url, self.image_key)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Input:
    kind: str  # folder | list | wds
    spec: str
    units: list[Unit]
    total: int | None  # number of samples when known without reading shards
    limit: int | None = None  # shards: only the first N samples, counted as the shards are read (--limit)

    def describe(self) -> dict[str, Any]:
        d = {"kind": self.kind, "spec": self.spec, "units": len(self.units), "total": self.total}
        if "://" not in self.spec and not self.spec.startswith("pipe:"):
            d["path"] = os.path.abspath(self.spec)  # a resume may write the same local input another way
        return d


# ---- folders and lists -----------------------------------------------------------------------------------------
COMPRESSED_TARS = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
# what to look at when every sample of an input failed, by the kind of input
NOTHING_READ_FIX = {
    "folder": "read the failure records (`s2 inspect OUT --json` or OUTDIR/errors.jsonl): each says why its image failed",
    "list": "read the failure records (`s2 inspect OUT --json` or OUTDIR/errors.jsonl); relative paths in a .txt list "
            "resolve against the list's folder",
    "wds": "read the failure records (`s2 inspect OUT --json` or OUTDIR/errors.jsonl); a MissingImage record lists "
           "the sample's members: pass their image extension with --image-key",
}


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


# ---- WebDataset ------------------------------------------------------------------------------------------------
def expand_shards(spec: str) -> list[str]:
    """Brace patterns, globs, a folder of .tar files, or `pipe:` commands -> the shard URLs, in order."""
    if spec.startswith("pipe:"):
        from braceexpand import braceexpand

        return list(braceexpand(spec))
    if local_of(spec) is None:
        return _expand_remote(spec)
    p = Path(spec)
    if p.is_dir():
        urls = sorted(str(x) for x in p.iterdir() if x.name.endswith(".tar") and x.is_file())
    else:
        from braceexpand import braceexpand

        urls = []
        for part in braceexpand(spec):
            urls.extend(sorted(glob.glob(part)) if glob.has_magic(part) else [part])
    return _checked_shards(urls, spec, os.path.exists, "check the pattern (quote braces in the shell: "
                           "'shards/{00000..00009}.tar')")


def _checked_shards(urls: list[str], spec: str, exists: Callable[[str], bool], fix: str) -> list[str]:
    """The expanded shards, each of which exists; else one line naming how many are missing (or that none match)."""
    missing = [u for u in urls if not exists(u)]
    if missing:
        raise ConfigError(f"{len(missing)} of {len(urls)} shards do not exist, e.g. {missing[0]}", given=spec, fix=fix)
    if not urls:
        raise ConfigError("no shards match", given=spec, fix="pass a brace pattern, a glob, or a folder of .tar files")
    return urls


def _expand_remote(spec: str) -> list[str]:
    """`expand_shards` for URLs: the brace pattern expanded as for local paths; globs and a folder of .tar listed,
    and every shard checked to exist, through the URL's file system."""
    from braceexpand import braceexpand

    fs, root = filesystem(spec)
    fs.invalidate_cache()
    if not glob.has_magic(spec) and "{" not in spec and not spec.endswith(".tar") and fs.isdir(root):
        urls = sorted(fs.unstrip_protocol(p) for p in fs.ls(root, detail=False) if p.endswith(".tar"))
    else:
        urls = []
        for part in braceexpand(spec):
            urls.extend(sorted(fs.unstrip_protocol(p) for p in fs.glob(filesystem(part)[1])) if glob.has_magic(part)
                        else [part])
    return _checked_shards(urls, spec, lambda u: fs.exists(filesystem(u)[1]), "check the URL and the pattern "
                           "(quote braces in the shell: 's3://b/{00000..00009}.tar')")


def _tar_stream(url: str, handler: Callable[[BaseException], bool]) -> Iterator[dict[str, Any]]:
    """The samples of one tar as webdataset groups them: a local path (or pipe:) through webdataset's own
    opener, a URL streamed through its fsspec file system."""
    from webdataset.tariterators import group_by_keys, tar_file_expander, tarfile_samples

    if local_of(url) is not None or url.startswith("pipe:"):
        yield from tarfile_samples([{"url": str(local_of(url) or url)}], handler=handler)
        return
    try:
        stream = open_url(url)
    except Exception as e:  # unreachable, refused, gone since it was listed: the unit's one failure
        handler(e)
        return
    with stream:
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}], handler=handler), handler=handler)


def _tar_samples(url: str, image_key: str) -> Iterator[Sample | dict[str, str]]:
    errors: list[BaseException] = []

    def handler(exn: BaseException) -> bool:
        errors.append(exn)
        return True

    exts = [e.strip().lower() for e in image_key.split(";") if e.strip()]
    reported = False  # one broken stream is one failure, however many layers of the reader saw it

    def stream_failures() -> Iterator[dict[str, str]]:
        nonlocal reported
        while errors:
            exn = errors.pop(0)
            if isinstance(exn, ValueError) and "duplicate file name" in str(exn):
                continue  # a repeated member inside one sample: the first is kept, as with duplicate keys
            if not reported:
                reported = True
                yield _stream_failure(url, exn)

    for s in _tar_stream(url, handler):
        yield from stream_failures()
        key = s["__key__"]
        img_ext = next((e for e in exts if e in s), None)
        if img_ext is None:
            members = sorted(k for k in s if not k.startswith("__"))
            yield {"key": key, "source": f"{url}#{key}", "stage": "read", "error_class": "MissingImage",
                   "error": f"no image member ({'/'.join(exts)}); the sample has: {', '.join(members) or 'nothing'}"
                            + _dotted_names_hint(key, members)}
            continue
        meta: dict[str, Any] = {}
        if "json" in s:
            try:
                meta["json"] = json.loads(s["json"])
            except ValueError:
                meta["json"] = s["json"].decode("utf-8", "replace")
        if "txt" in s:
            meta["txt"] = s["txt"].decode("utf-8", "replace")
        yield Sample(key, f"{url}#{key}", data=s[img_ext], meta=json.dumps(meta) if meta else None)
    yield from stream_failures()


def _dotted_names_hint(key: str, members: list[str]) -> str:
    """Why members such as `img.001.jpg`, `img.002.jpg` make one sample without an image: WebDataset's rule."""
    dotted = [m for m in members if "." in m and m.lower().endswith(IMAGE_EXTS)]
    if not dotted:
        return ""
    return (f". WebDataset takes a sample's key up to the first dot of a member's name, so {key}.{dotted[0]} is member "
            f"{dotted[0]!r} of sample {key!r} (and files differing after that dot are one sample): name the files "
            f"without extra dots (e.g. {key}_{dotted[0]}), or pass --image-key {dotted[0]} to read that one")


def _stream_failure(url: str, exn: BaseException) -> dict[str, str]:
    msg = str(exn.args[0]) if exn.args else str(exn)
    return {"key": f"{Path(url).name}:<stream>", "source": url, "stage": "read", "error_class": type(exn).__name__,
            "error": f"reading the tar failed: {msg}"}


# ---- the input ---------------------------------------------------------------------------------------------------
def detect_format(spec: str) -> str:
    if spec.startswith("pipe:") or "{" in spec or spec.endswith(".tar") or glob.has_magic(spec):
        return "wds"
    if local_of(spec) is None:
        return _detect_remote(spec)
    p = Path(local_of(spec))  # type: ignore[arg-type]
    if p.is_file() and p.suffix.lower() in (".txt", ".csv", ".parquet"):
        return "list"
    if p.is_dir():
        if any(x.name.endswith(".tar") for x in p.iterdir()) and not any(
                x.name.lower().endswith(IMAGE_EXTS) for x in p.iterdir()):
            return "wds"
        return "folder"
    if not p.exists():
        raise ConfigError("input does not exist", given=spec, fix="pass an existing folder, list or shards")
    raise ConfigError("cannot tell what kind of input this is", given=spec,
                      expected="a folder, a .txt/.csv/.parquet list, or .tar shards",
                      fix="pass --input-format folder|list|wds")


def _detect_remote(url: str) -> str:
    """`detect_format` for a URL, asked of its file system."""
    fs, path = filesystem(url)
    fs.invalidate_cache()
    if url.lower().endswith((".txt", ".csv", ".parquet")) and fs.isfile(path):
        return "list"
    if fs.isdir(path):
        names = [n.rsplit("/", 1)[-1] for n in fs.ls(path, detail=False)]
        if any(n.endswith(".tar") for n in names) and not any(n.lower().endswith(IMAGE_EXTS) for n in names):
            return "wds"
        return "folder"
    if not fs.exists(path):
        raise ConfigError("input does not exist", given=url, fix="pass an existing folder, list or shards")
    raise ConfigError("cannot tell what kind of input this is", given=url,
                      expected="a folder, a .txt/.csv/.parquet list, or .tar shards",
                      fix="pass --input-format folder|list|wds")


def open_input(spec: str, input_format: str = "auto", shard_size: int = 1000, limit: int | None = None,
               image_key: str | None = None, meta_columns: str = "all", keep_ext: bool = False,
               videos: bool = False) -> Input:
    """Resolve the input into units. Folders and lists are listed now (key clashes are errors before any work);
    shards are only named, and read when their unit runs. `videos`: frames of videos are sampled (--num-frames,
    --fps, --max-frames; shards then also read video members); without it, a listed video file is refused."""
    if input_format not in INPUT_FORMATS:
        raise ConfigError("--input-format is not known", given=input_format, expected=" | ".join(INPUT_FORMATS),
                          fix="pass --input-format auto")
    kind = detect_format(spec) if input_format == "auto" else input_format
    if meta_columns != "all" and kind != "list":
        raise ConfigError("--meta-columns picks the columns of a .csv/.parquet list", given=f"{kind} input {spec}",
                          fix="drop --meta-columns (folders read key.json/key.txt beside each image, shards their "
                              "json/txt members)")
    if keep_ext and kind == "wds":
        raise ConfigError("--keep-ext keeps file extensions in keys, and WebDataset keys (__key__) have none",
                          given=spec, fix="drop --keep-ext")
    if kind == "wds":
        urls = expand_shards(spec)
        key = image_key or (f"{DEFAULT_IMAGE_KEY};{VIDEO_MEMBERS}" if videos else DEFAULT_IMAGE_KEY)
        if videos:
            require_av()
        units = [Unit(i, u, url=u, image_key=key) for i, u in enumerate(urls)]
        return Input(kind, spec, units, None, limit=limit or None)
    samples = scan_folder(spec, keep_ext) if kind == "folder" else read_list(spec, meta_columns, keep_ext)
    if limit:
        samples = samples[:limit]
    _check_videos(samples, videos)
    units = [Unit(i, f"{kind}[{s}:{s + len(samples[s:s + shard_size])}]", samples[s:s + shard_size])
             for i, s in enumerate(range(0, len(samples), shard_size))]
    return Input(kind, spec, units, len(samples))


def _check_videos(samples: list[Sample], videos: bool) -> None:
    """Listed video files (by name) need PyAV and a frame sampling, said before any work starts."""
    named = [s for s in samples if s.source.lower().endswith(VIDEO_EXTS)]
    if not named:
        return
    require_av()
    if not videos:
        raise ConfigError(f"the input holds {len(named)} video file(s) (e.g. {printable(named[0].source)}) and no "
                          "frame sampling was given", expected="--num-frames N, --fps F or --max-frames M",
                          fix="add e.g. --num-frames 8 (docs/video.md)")


# ---- decode and fit ----------------------------------------------------------------------------------------------
def _open(sample: Sample) -> Image.Image:
    if sample.data is None and local_of(sample.source) != sample.source:  # at a URL
        return Image.open(_read(sample))
    return Image.open(io.BytesIO(sample.data) if sample.data is not None else sample.source)


def _read(sample: Sample) -> Any:
    """The stage `read`: the bytes of a sample (of a stream, or the whole file), with a plain reason when the file
    vanished (deleted after the input was listed), is not readable, or is not a file. The file is read whole
    here, so that an I/O error is this stage's (and retried by --retries), never the decoder's."""
    if sample.data is not None:
        return io.BytesIO(sample.data)
    src = sample.source
    if local_of(src) is None:
        return _read_url(src)
    src = str(local_of(src))
    if not os.path.lexists(src):
        raise FileNotFoundError(f"no such file: {printable(src)} (deleted or moved after the input was listed?)")
    if os.path.isdir(src):
        raise IsADirectoryError(f"a folder, not an image file: {printable(src)}")
    try:
        with open(src, "rb") as fh:
            return io.BytesIO(fh.read())
    except PermissionError:
        raise PermissionError(f"permission denied reading {printable(src)}") from None
    except OSError as e:  # a symlink loop (ELOOP), a broken link, an I/O error
        raise type(e)(f"{e.strerror or e} reading {printable(src)}") from None


RETRY_BACKOFF_S = 0.2  # --retries: the first wait after a failed read; doubled each time, at most RETRY_MAX_WAIT_S
RETRY_MAX_WAIT_S = 5.0


def read_retrying(sample: Sample, retries: int) -> Any:
    """`_read`, tried again up to `retries` times after an OSError (a network file system's hiccup, a file being
    replaced), waiting 0.2 s, 0.4 s, ... (at most 5 s) in between; a folder given as a file is not retried. The
    last error says how many times the read was tried."""
    for attempt in range(retries + 1):
        try:
            return _read(sample)
        except (IsADirectoryError, NotADirectoryError):
            raise
        except OSError as e:
            if attempt == retries:
                if retries:
                    raise type(e)(f"{e} (tried {retries + 1} times)") from None
                raise
            time.sleep(min(RETRY_BACKOFF_S * 2 ** attempt, RETRY_MAX_WAIT_S))


def _read_url(url: str) -> io.BytesIO:
    """The bytes of an image at a URL (a remote folder's or list's image), with a plain reason when it is gone."""
    try:
        with open_url(url) as fh:
            return io.BytesIO(fh.read())
    except FileNotFoundError:
        raise FileNotFoundError(f"no such object: {printable(url)} (deleted or moved after the input was listed?)") from None


def load_rgb(fh: Any) -> tuple[Image.Image, dict[str, Any]]:
    """Decode one image to RGB the way the HF processors do, and say what was done when it was not plain RGB:
    EXIF orientation applied; the first frame of an animation; alpha (RGBA, LA, palette transparency, the colour
    key of an RGB or grayscale PNG) composited on white; 16-bit grayscale (PNG/TIFF) scaled to 8 bits, not
    clipped; CMYK, palette, 1-bit and gray converted.
    Images over Pillow's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`) are refused from their header."""
    notes: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            raw = Image.open(fh)
        except Image.DecompressionBombWarning as w:  # between 1x and 2x the limit Pillow only warns: refuse too
            raise Image.DecompressionBombError(str(w)) from None
        except UnidentifiedImageError:
            raise UnidentifiedImageError(_unidentified(fh)) from None
    with raw:
        frames = getattr(raw, "n_frames", 1)
        if frames > 1:
            raw.seek(0)
            notes.update(frames=frames, frame_used=0)
        if frames == 1 and _orientation(raw) == 1:  # the common case: decoded in place, no copies
            raw.load()
            im = raw
        else:
            im = ImageOps.exif_transpose(raw)
            if im is raw:  # older Pillow returns the image itself when there is nothing to do
                im = raw.copy()
    mode = im.mode
    if mode != "RGB":
        notes["mode"] = mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8), "L")
    elif mode == "F":
        a = np.asarray(im, dtype=np.float64)
        hi = 1.0 if a.size and np.nanmax(a) <= 1.0 else 255.0
        im = Image.fromarray(np.clip(np.round(np.nan_to_num(a) * (255.0 / hi)), 0, 255).astype(np.uint8), "L")
    # transformers' convert_to_rgb composites any image with an alpha band or a transparency entry (a palette's,
    # or the colour key of an RGB or grayscale PNG: tRNS)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or im.info.get("transparency") is not None:
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        im = canvas
        notes["alpha"] = "composited on white"
    return (im if im.mode == "RGB" else im.convert("RGB")), notes


def _unidentified(fh: Any) -> str:
    """What Pillow could not identify, in words: a JPEG of a kind it cannot decode (12/16-bit, lossless), or
    a file that is no image it knows, by its first bytes."""
    try:
        fh.seek(0)
        head = fh.read(1 << 16)
    except (OSError, ValueError):
        head = b""
    name = getattr(fh, "name", None)
    where = f"{printable(name)}: " if isinstance(name, str) else ""
    if head[:2] == b"\xff\xd8":
        for i in range(2, len(head) - 4):  # the first start-of-frame marker: its kind and sample precision
            if head[i] == 0xFF and 0xC0 <= head[i + 1] <= 0xCF and head[i + 1] not in (0xC4, 0xC8, 0xCC):
                bits, lossless = head[i + 4], head[i + 1] in (0xC3, 0xC7, 0xCB, 0xCF)
                kind = f"{bits}-bit" + (" lossless" if lossless else "")
                return (f"{where}a {kind} JPEG, which Pillow cannot decode (it reads 8-bit lossy JPEGs); convert it "
                        "to an 8-bit JPEG or a 16-bit PNG")
        return f"{where}a JPEG whose header Pillow cannot read (damaged or an unsupported kind)"
    return f"{where}not an image format Pillow knows (it begins with {head[:8]!r})"


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation tag (1 = as stored), read from the header without decoding pixels."""
    try:
        return int(im.getexif().get(0x0112, 1) or 1)
    except Exception:
        return 1


def is_video(sample: Sample) -> bool:
    """The sample's first bytes are a video container's (`video.looks_like_video`), whatever its name."""
    with _read(sample) as fh:
        return looks_like_video(fh.read(16))


def video_header(sample: Sample) -> Any:
    """A video sample's container header (`video.header`)."""
    return header(_video_src(sample))


def _video_src(sample: Sample) -> str | bytes:
    """What PyAV opens for a video sample: its bytes (a stream member, or a file on remote storage, fetched
    whole), or its local path (PyAV seeks in it)."""
    if sample.data is not None:
        return sample.data
    if local_of(sample.source) is None:
        return _read_url(sample.source).getvalue()
    return str(local_of(sample.source))


def image_size(sample: Sample) -> tuple[int, int]:
    """(h, w) as displayed, from the header alone (EXIF orientation applied, no pixels decoded)."""
    with _open(sample) as im:
        w, h = im.size
        orientation = _orientation(im)
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def fit_size(orig_hw: tuple[int, int], fit: str, side: int) -> tuple[int, int]:
    """The (h, w) an image of `orig_hw` has after fitting to the largest scale `side`."""
    if fit == "keep":
        h, w = orig_hw
        if h <= w:
            return side, max(1, int(side * w / h))
        return max(1, int(side * h / w)), side
    return side, side


class ImageShapeError(ValueError):
    """An image whose shape no fit can use (recorded as the image's failure, stage `preprocess`)."""


# beyond this aspect ratio a fit does not build the intermediate image a processor would (crop: the crop box alone
# is resized; pad: the image is reduced before it is padded), so memory stays near the output's size; the pixels
# are then close to the processor's, not always bit-equal (Pillow's box resize rounds its passes differently)
LONG_ASPECT = 16


def check_shape(w: int, h: int, fit: str, side: int) -> None:
    """Refuse an image no fit can use at `side` px: one whose aspect ratio exceeds `side` (fitted whole, its short
    side would be under one pixel; cropped, a sliver of under 1/side of it would be kept), and with fit `keep`
    one whose fitted size exceeds Pillow's decompression-bomb limit."""
    ratio = max(w, h) / max(1, min(w, h))
    if ratio > side:
        raise ImageShapeError(f"a {w}x{h} image (aspect ratio {ratio:.0f}:1) is beyond what any fit can use at "
                              f"{side} px (at most {side}:1); crop or split it first")
    th, tw = fit_size((h, w), "keep", side)
    limit = Image.MAX_IMAGE_PIXELS
    if fit == "keep" and limit and th * tw > limit:
        raise ImageShapeError(f"a {w}x{h} image fitted with --fit keep would be {tw}x{th}, over Pillow's "
                              f"decompression-bomb limit of {limit} pixels; use --fit crop or pad, or crop it first")


def fit_image(im: Image.Image, fit: str, side: int, mean: tuple[float, float, float]) -> Image.Image:
    """crop: shortest edge to `side` then center crop (CLIP's processor); squash: to side x side (SigLIP's);
    pad: to a square filled with the mean color first (LLaVA's `pad`), then resized; keep: shortest edge to
    `side`, aspect kept. Resizes are Pillow bicubic (antialiased when shrinking), as the HF processors do. Past
    an aspect ratio of LONG_ASPECT, crop resizes only the crop box and pad reduces first (close, not always
    bit-equal); past `check_shape`, an ImageShapeError."""
    w, h = im.size
    check_shape(w, h, fit, side)
    if fit == "squash":
        return im.resize((side, side), Image.BICUBIC)
    if fit == "pad":
        if max(w, h) > LONG_ASPECT * min(w, h) and max(w, h) > 4 * side:
            im = im.reduce(max(w, h) // (4 * side))  # the padded canvas stays near (4 side)^2 pixels
            w, h = im.size
        if w != h:
            canvas = Image.new("RGB", (max(w, h), max(w, h)), tuple(int(m * 255) for m in mean))
            canvas.paste(im, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
            im = canvas
        return im.resize((side, side), Image.BICUBIC)
    th, tw = fit_size((h, w), "keep", side)
    top, left = (th - side) // 2, (tw - side) // 2
    if fit == "crop" and max(w, h) > LONG_ASPECT * min(w, h):  # never the whole long strip at full size
        sx, sy = w / tw, h / th
        return im.resize((side, side), Image.BICUBIC, box=(left * sx, top * sy, (left + side) * sx, (top + side) * sy))
    if (tw, th) != (w, h):
        im = im.resize((tw, th), Image.BICUBIC)
    if fit == "keep":
        return im
    return im.crop((left, top, left + side, top + side))


def render_views(im: Image.Image, plan: Any, fit: Fit) -> list[np.ndarray]:
    """A strategy's views of the original image, each (3, H, W) uint8, as their authors render them with Pillow:
    squash = resize to the canvas (bicubic, antialiased when shrinking, as `image.resize(size)` does); letterbox =
    resize aspect-kept, then paste centered on a black canvas (LLaVA-NeXT); fit = the --fit mode to a square.
    A plan whose views share one source (dual) renders only its first view."""
    out = []
    for v in plan.views[:1] if plan.same_source else plan.views:
        if v.render == "fit":
            r = fit_image(im, fit.strategy.fit, v.canvas[0], fit.mean)
        elif v.render == "letterbox":
            r = Image.new("RGB", (v.canvas[1], v.canvas[0]), (0, 0, 0))
            r.paste(im.resize((v.resize[1], v.resize[0]), Image.BICUBIC), (v.pad[1], v.pad[0]))
        else:
            r = im.resize((v.canvas[1], v.canvas[0]), Image.BICUBIC)
        out.append(to_uint8_array(r))
    return out


def fit_to_array(im: Image.Image, fit: Fit) -> np.ndarray:
    """The S² engine's input: the image fitted once to the largest scale, (3, H, W) uint8."""
    return to_uint8_array(fit_image(im, fit.mode, fit.side, fit.mean))


def to_uint8_array(im: Image.Image) -> np.ndarray:
    """(3, H, W) uint8, contiguous."""
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))


def failure(sample: Sample, stage: str, error: BaseException | str, error_class: str | None = None) -> dict[str, str]:
    """One failure record: which sample, where it came from, the stage that failed, and why."""
    return {"key": sample.key, "source": printable(sample.source), "stage": stage,
            "error_class": error_class or type(error).__name__, "error": str(error)}


@dataclass(frozen=True)
class Fit:
    """How every image is brought to the engine's input: the fit mode, the side, the pad color."""

    mode: str
    side: int
    mean: tuple[float, float, float]
    strategy: Any = None  # a StrategyCfg: the settings of a dynamic-resolution strategy's views
    decode: str = "pil"  # "torch": workers only read and probe (read_for_device); the main thread decodes
    render: Callable[[Image.Image, "Fit"], Any] | None = None  # the strategy's rendering; None: `fit_to_array`
    retries: int = 0  # --retries: a read that fails with an OSError is tried again this many times
    video: Sampling = Sampling()  # how a video's frames are chosen; inactive: a video is a failure

    def __post_init__(self) -> None:
        if self.mode not in FITS:
            raise ConfigError("fit is not known", given=self.mode, expected=" | ".join(FITS), fix="use --fit crop")
        if self.decode not in DECODES:
            raise ConfigError("--decode is not known", given=self.decode, expected=" | ".join(DECODES), fix="use --decode pil")


def decode_sample(sample: Sample, fit: Fit) -> dict[str, Any]:
    """Sample -> record with `image` (3, H, W) uint8 and `orig_hw`, or `error` (a failure record)."""
    if fit.decode == "torch":
        return read_for_device(sample, fit)
    rec: dict[str, Any] = {"key": sample.key, "source": printable(sample.source), "meta": None, "image": None,
                           "orig_hw": None, "error": None}
    stage = "read"
    t0 = time.perf_counter()
    try:
        rec["meta"] = sample_meta(sample)
        fh = read_retrying(sample, fit.retries)
        stage = "decode"
        t1 = time.perf_counter()
        with fh:
            head = fh.read(16)
            fh.seek(0)
            if looks_like_video(head):
                fetched = fh.getvalue() if sample.data is None and local_of(sample.source) is None else None
                return _decode_video(sample, fit, rec, t0, t1, fetched)
            im, notes = load_rgb(fh)
        t2 = time.perf_counter()
        if notes:
            meta = json.loads(rec["meta"]) if rec["meta"] else {}
            rec["meta"] = json.dumps({**meta, "decode": notes})
        rec["orig_hw"] = (im.height, im.width)
        stage = "preprocess"
        rec["image"] = (fit.render or fit_to_array)(im, fit)
        rec["seconds"] = (t1 - t0, t2 - t1, time.perf_counter() - t2)  # read, decode, fit: the run's stage split
    except Exception as e:  # recorded per sample; the run goes on (plain dict: it crosses process borders)
        rec["error"] = failure(sample, stage, e)
    return rec


def _decode_video(sample: Sample, fit: Fit, rec: dict[str, Any], t0: float, t1: float,
                  fetched: bytes | None = None) -> dict[str, Any]:
    """A video's record: `frames`, each chosen frame fitted as an image is, `orig_hw` (upright), and in `video` the
    chosen frames' indices and timestamps (video.read_clip); or `error`, one record for the whole video."""
    stage = "decode"
    try:
        if not fit.video.active:
            raise ValueError("a video, and no frame sampling was given (--num-frames N, --fps F or --max-frames M)")
        clip = read_clip(fetched if fetched is not None else _video_src(sample), fit.video)
        t2 = time.perf_counter()
        stage = "preprocess"
        rec["orig_hw"] = (clip.frames[0].height, clip.frames[0].width)
        rec["frames"] = [(fit.render or fit_to_array)(im, fit) for im in clip.frames]
        rec["video"] = clip.meta()
        rec["seconds"] = (t1 - t0, t2 - t1, time.perf_counter() - t2)
    except Exception as e:  # the whole video fails: no entry, one record
        rec["error"] = failure(sample, stage, e)
        rec.pop("frames", None)
    return rec


def with_decode_note(meta: str | None, note: dict[str, Any]) -> str:
    """`meta` (JSON text or None) with `note` merged into its `decode` entry."""
    m = json.loads(meta) if meta else {}
    m["decode"] = {**m.get("decode", {}), **note}
    return json.dumps(m)


def probe_jpeg(data: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """From the header alone: whether the device decoder (torchvision decode_jpeg) takes these bytes. Returns
    ({stored_hw, orientation, mode}, None) for an 8-bit RGB or grayscale JPEG (baseline or progressive) that ends
    with its end-of-image marker and is within Pillow's decompression-bomb limit; else (None, the reason)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
        with im:
            fmt, mode, (w, h) = im.format, im.mode, im.size
            try:
                orientation = int(im.getexif().get(0x0112, 1))
            except Exception:
                orientation = 1
    except Exception as e:
        return None, f"header not readable ({type(e).__name__})"
    if fmt != "JPEG":
        return None, f"{fmt or 'unknown'} image, not a JPEG"
    if mode not in ("RGB", "L"):
        return None, f"JPEG in mode {mode}"
    if not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        return None, "no JPEG end-of-image marker (truncated, or data after the image)"
    return {"stored_hw": (h, w), "orientation": orientation if 1 <= orientation <= 8 else 1, "mode": mode}, None


def read_for_device(sample: Sample, fit: Fit) -> dict[str, Any]:
    """`--decode torch`, in the decode worker: read the bytes and probe the header (`probe_jpeg`). A JPEG the
    device decoder takes travels as bytes (`jpeg`, with `stored_hw`, `orientation`; `orig_hw` upright) and is
    decoded and fitted by the main thread on the run's device (`devicepath.decode_batch`); anything else is
    decoded here with Pillow exactly as `--decode pil` does, its meta.decode saying path "pil-fallback" and why.
    A read failure is the same record as with Pillow."""
    t0 = time.perf_counter()
    pil = Fit(fit.mode, fit.side, fit.mean, video=fit.video)
    try:
        own_meta = sample_meta(sample)
        with read_retrying(sample, fit.retries) as fh:
            data = fh.read()
    except Exception:
        return decode_sample(sample, pil)  # the same failure record as the pil path
    t1 = time.perf_counter()
    info, reason = probe_jpeg(data)
    if info is not None and max(info["stored_hw"]) > LONG_ASPECT * max(1, min(info["stored_hw"])):
        info, reason = None, f"aspect ratio over {LONG_ASPECT}:1 (Pillow fits it without the full-size resize)"
    if info is None:
        rec = decode_sample(Sample(sample.key, sample.source, data=data, meta=own_meta), pil)
        if rec["error"] is None:
            rec["meta"] = with_decode_note(rec["meta"], {"path": "pil-fallback", "reason": reason})
            rec["seconds"] = (t1 - t0, *rec["seconds"][1:])
        return rec
    h, w = info["stored_hw"]
    meta = own_meta if info["mode"] == "RGB" else with_decode_note(own_meta, {"mode": info["mode"]})
    return {"key": sample.key, "source": printable(sample.source), "meta": meta, "source_meta": own_meta,
            "image": None, "error": None, "jpeg": np.frombuffer(bytearray(data), dtype=np.uint8),
            "stored_hw": info["stored_hw"], "orientation": info["orientation"],
            "orig_hw": (w, h) if info["orientation"] in (5, 6, 7, 8) else (h, w),
            "seconds": (t1 - t0, time.perf_counter() - t1, 0.0)}


DECODE_NICE = 10  # niceness added to decode workers (S2CLI_DECODE_NICE overrides); chosen by benchmarks/bench_overlap.py


def decode_nice() -> int:
    """How much lower than the main process the decode workers run (0..19). The main process drives the
    device (CUDA kernel launches, or the forward's threads on a CPU), so workers that only fill its idle time
    keep the forward from waiting; S2CLI_DECODE_NICE=N overrides the default."""
    raw = os.environ.get("S2CLI_DECODE_NICE", "").strip()
    if not raw:
        return DECODE_NICE
    try:
        n = int(raw)
    except ValueError:
        raise ConfigError("S2CLI_DECODE_NICE must be an integer", given=raw, expected="0..19",
                          fix="unset it, or set e.g. S2CLI_DECODE_NICE=10") from None
    if not 0 <= n <= 19:
        raise ConfigError("S2CLI_DECODE_NICE is out of range", given=n, expected="0..19", fix="use e.g. 10")
    return n


def _worker_init(nice: int = 0) -> None:
    # Ctrl-C reaches the whole process group: only the parent acts on it (a worker killed by it could die holding
    # the pool's queue lock, and the parent's pool shutdown would wait for that lock forever); SIGTERM (the pool's
    # own shutdown) ends a worker at once, whatever handler the parent had when it forked
    # SIGUSR1 (SLURM's warning before the time limit, sent to every process of a step) is the parent's to act on:
    # it stops the pool; a worker that inherited the parent's handler would print a traceback instead
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass
    if nice:
        os.nice(nice)


def _decode_job(args: tuple[Sample, Fit]) -> dict[str, Any]:
    return decode_sample(*args)


class DecodePool:
    """Decodes samples in `workers` processes, in order, with at most `window` in flight (memory stays flat
    whatever the input's length). A sample whose worker stalls or dies is recorded after `timeout` seconds
    instead of being waited on forever. workers=0 decodes in the calling thread."""

    def __init__(self, fit: Fit, workers: int, timeout: float = 120.0, window: int | None = None):
        self.fit, self.workers, self.timeout = fit, workers, timeout
        self.window = window or max(4, 4 * workers)
        self.nice = decode_nice()
        self._pool = (mp.get_context("fork").Pool(workers, initializer=_worker_init, initargs=(self.nice,))
                      if workers > 0 else None)

    def map(self, items: Iterable[Any], sample_of: Callable[[Any], Sample | dict]) -> Iterator[tuple[Any, dict]]:
        """For each item (anything carrying a sample), yield (item, record) in input order. Items whose sample is
        already a failure record pass through without decoding."""
        if self._pool is None:
            for item in items:
                s = sample_of(item)
                yield item, ({"key": s["key"], "error": s} if isinstance(s, dict) else decode_sample(s, self.fit))
            return
        pending: deque = deque()
        for item in items:
            s = sample_of(item)
            job = None if isinstance(s, dict) else self._pool.apply_async(_decode_job, ((s, self.fit),))
            pending.append((item, s, job))
            if len(pending) >= self.window:
                yield self._get(*pending.popleft())
        while pending:
            yield self._get(*pending.popleft())

    def _get(self, item: Any, s: Sample | dict, job: Any) -> tuple[Any, dict]:
        if job is None:
            return item, {"key": s["key"], "error": s}  # type: ignore[index]
        try:
            return item, job.get(timeout=self.timeout)
        except mp.TimeoutError:
            err = failure(s, "decode", f"no result after {self.timeout:.0f}s (the decode worker stalled or died)",  # type: ignore[arg-type]
                          "WorkerTimeout")
            return item, {"key": s.key, "error": err}  # type: ignore[union-attr]

    def close(self, deadline: float = 10.0) -> None:
        """Stop the workers, within `deadline` seconds whatever they are doing: the pool's own shutdown waits for
        its queue lock, which a worker that died (killed, out of memory) may hold forever, so it runs aside and,
        past the deadline, the workers are killed and it is left behind."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        workers = list(getattr(pool, "_pool", ()))
        stop = threading.Thread(target=lambda: (pool.terminate(), pool.join()), name="s2cli-decode-close", daemon=True)
        stop.start()
        stop.join(deadline)
        if stop.is_alive():
            for w in workers + list(getattr(pool, "_pool", ())):
                if w.exitcode is None:
                    w.kill()
            stop.join(1.0)

    def __enter__(self) -> "DecodePool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
