"""The output formats: one `Format` record each (its name, suffix, whether an output is one file or a folder, its
sink and reader, its header limits, how its identity is hashed), looked up by name or by a path's suffix. The
settings, the output folder, the readers and the run ask here; nothing else names a format. Built-in formats
name their sink and reader as "module:Class" (loaded on first use, as fsspec's registry does), so that asking
which formats exist imports no format library; `register` takes classes too (a test registers a toy format)."""
from __future__ import annotations

import hashlib
import importlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import xxhash

from ..errors import ConfigError

FILE, DIR = "file", "dir"


# what a done marker records a shard's bytes by: new shards get the first (xxh3-128, an order of magnitude faster than
# sha256, whose digest was the writer's largest cost per image: docs/performance.md); a marker written before keeps and is
# checked by the one it names. A digest tells a damaged, truncated or replaced shard; it is not a signature.
DIGESTS: dict[str, Callable[[], Any]] = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}
DIGEST = "xxh3_128"


def _update(h: Any, path: Path) -> None:
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)


def store_files(path: Path) -> list[Path]:
    """The files an output store is made of: itself (a file), or every file under it, in name order (a folder)."""
    path = Path(path)
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def store_bytes(path: Path) -> int:
    """Bytes of an output store on disk (a file's size, or the sum of a folder's files)."""
    return sum(p.stat().st_size for p in store_files(path))


def store_identity(path: Path, digest: str = DIGEST) -> dict[str, Any]:
    """What makes a stored shard whole, for its done marker: its bytes and their `digest` (one of DIGESTS; a
    folder's: over each file's relative name and bytes, in name order), keyed by the digest's name."""
    path = Path(path)
    h = DIGESTS[digest]()
    if not path.is_dir():
        _update(h, path)
        return {"bytes": path.stat().st_size, digest: h.hexdigest()}
    files = store_files(path)
    for p in files:
        h.update(p.relative_to(path).as_posix().encode() + b"\0")
        _update(h, p)
    return {"bytes": sum(p.stat().st_size for p in files), digest: h.hexdigest()}


def marker_digest(marker: dict[str, Any]) -> str | None:
    """Which of DIGESTS a done marker recorded its shard's bytes by (None: none, a marker from before digests)."""
    return next((name for name in DIGESTS if name in marker), None)


def _load(ref: str | type | Callable) -> Any:
    if not isinstance(ref, str):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Format:
    """One output format. `sink`: a `writers.ThreadedSink` subclass taking (path, attrs, layout); `reader`: a
    `readers.Reader` class taking (path, raw=False); either as a class or "module:Class". `store`: "file" (one
    file) or "dir" (a folder of files, written under a temporary name and renamed whole). `header_limit`: bytes
    the format's per-shard header can hold (None: no limit) and `header_per_image` what one image takes there, so
    the default shard size stays under it. `identity(path, digest)`: what a done marker records of a shard,
    its bytes and their digest keyed by the digest's name (one of DIGESTS); a shard is checked by the same function.
    `remote`: whether it can be written to a folder on remote storage (files only, today)."""

    name: str
    suffix: str
    sink: str | type
    reader: str | type
    store: str = FILE
    header_limit: int | None = None
    header_per_image: int = 0
    identity: Callable[[Path, str], dict[str, Any]] = store_identity
    remote: bool = True
    doc: str = ""

    def sink_class(self) -> Any:
        return _load(self.sink)

    def open(self, path: str | os.PathLike, raw: bool = False) -> Any:
        """This format's reader over the output at `path`."""
        return _load(self.reader)(path, raw=raw)

    def max_images(self) -> int | None:
        """The most images one shard can hold under the header limit (None: no limit)."""
        return self.header_limit // self.header_per_image if self.header_limit and self.header_per_image else None

    def exists(self, path: Path) -> bool:
        return path.is_dir() if self.store == DIR else path.is_file()


SAFETENSORS_HEADER_LIMIT = 100_000_000  # bytes: safetensors refuses to read (and write) a larger JSON header
# the default shard size leaves each image this much of the safetensors header (its record and ~1.5 KB of metadata)
SAFETENSORS_HEADER_PER_IMAGE = 2048

FORMATS: dict[str, Format] = {}  # by name, built-ins first (read it; add with `register`)


def register(fmt: Format, replace: bool = False) -> Format:
    """Add an output format (`replace`: over one of the same name). Its suffix must be its own."""
    if not fmt.suffix.startswith(".") or len(fmt.suffix) < 2:
        raise ValueError(f"a format's suffix starts with a dot: {fmt.suffix!r}")
    other = next((f for f in FORMATS.values() if f.suffix == fmt.suffix and f.name != fmt.name), None)
    if other is not None or (fmt.name in FORMATS and not replace):
        raise ValueError(f"format {fmt.name!r} ({fmt.suffix}) is registered already" +
                         (f" as {other.name!r}" if other else ""))
    FORMATS[fmt.name] = fmt
    return fmt


def unregister(name: str) -> None:
    FORMATS.pop(name, None)


def names() -> tuple[str, ...]:
    """The formats' names, built-ins first."""
    return tuple(FORMATS)


def get(name: str) -> Format:
    """The format named `name`; a name not registered is a ConfigError listing them."""
    if name not in FORMATS:
        raise ConfigError("--format is not known", given=name, expected=" | ".join(FORMATS),
                          fix=f"pass --format {next(iter(FORMATS))}")
    return FORMATS[name]


def of_path(path: str | os.PathLike) -> Format | None:
    """The format a path's suffix names (case-insensitive), or None."""
    suffix = Path(str(path).rstrip("/" + os.sep)).suffix.lower()
    return next((f for f in FORMATS.values() if f.suffix == suffix), None)


def suffixes() -> tuple[str, ...]:
    return tuple(f.suffix for f in FORMATS.values())


class NamePattern:
    """A regular expression over file names with `{suffix}` standing for any registered format's suffix (without its
    dot), built when used: a format registered later is matched too."""

    def __init__(self, pattern: str):
        self.pattern = pattern
        self._built: tuple[tuple[str, ...], re.Pattern] | None = None

    def _re(self) -> re.Pattern:
        now = suffixes()
        if self._built is None or self._built[0] != now:
            alt = "|".join(re.escape(s[1:]) for s in now)
            self._built = (now, re.compile(self.pattern.replace("{suffix}", f"(?:{alt})")))
        return self._built[1]

    def match(self, name: str) -> re.Match | None:
        return self._re().match(name)


register(Format("h5", ".h5", "s2cli.formats.hdf5:HDF5Sink", "s2cli.formats.hdf5:HDF5Reader",
                doc="HDF5: one dataset per array and attribute, chunked; read lazily with h5py"))
register(Format("safetensors", ".safetensors", "s2cli.formats.safetensors:SafetensorsSink",
                "s2cli.formats.safetensors:SafetensorsReader", header_limit=SAFETENSORS_HEADER_LIMIT,
                header_per_image=SAFETENSORS_HEADER_PER_IMAGE,
                doc="safetensors: one tensor per image, the records in the JSON header"))
