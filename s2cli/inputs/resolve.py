"""The input-kind registry: an input (a path, a pattern, a URL, a Python dataset) -> its kind (detected, or
given with --input-format) -> its units. Kinds register here in detection order (`register`); a kind added from
outside the package (a test's toy kind) is detected and opened the same way."""
from __future__ import annotations

import glob
import os
from typing import Any

from ..errors import ConfigError
from .dataset import DatasetKind
from .files import FilesKind
from .folder import FolderKind
from .kind import InputKind, InputOptions, where
from .lists import ListKind
from .tables import TableKind
from .units import Input
from .wds import WdsKind

KINDS: dict[str, InputKind] = {}


def register(kind: InputKind, first: bool = False) -> InputKind:
    """Add a kind (replacing one of the same name). Detection asks the kinds in order; `first`: before the others."""
    KINDS.pop(kind.name, None)
    items = list(KINDS.items())
    KINDS.clear()
    KINDS.update(([(kind.name, kind)] if first else []) + items + ([] if first else [(kind.name, kind)]))
    return kind


def unregister(name: str) -> None:
    KINDS.pop(name, None)


for _kind in (DatasetKind(), FilesKind(), TableKind(), ListKind(), WdsKind(), FolderKind()):
    register(_kind)

class _Formats:
    """The --input-format values: auto and every registered kind, as they are when asked (a kind registered
    later too)."""

    def __iter__(self):
        return iter(("auto", *KINDS))


INPUT_FORMATS = _Formats()


def input_formats() -> tuple[str, ...]:
    return tuple(INPUT_FORMATS)


def detect_format(spec: Any, opts: InputOptions = InputOptions()) -> str:
    """The name of the first kind that recognizes `spec`; else one line saying what inputs are read."""
    for name, kind in KINDS.items():
        if kind.detect(spec, opts):
            return name
    if isinstance(spec, str) and not glob.has_magic(spec) and where(spec)[0] is None:
        raise ConfigError("input does not exist", given=spec, fix="pass an existing folder, list, file or shards")
    raise ConfigError("cannot tell what kind of input this is", given=spec if isinstance(spec, str) else type(spec).__name__,
                      expected="a folder, an image or video file, a glob of them, a .txt/.csv list, .parquet/Arrow "
                               "tables, hf://datasets/ORG/NAME, .tar shards, or a torch/datasets Dataset",
                      fix="pass --input-format " + "|".join(KINDS))


def open_input(spec: Any, input_format: str = "auto", shard_size: int = 1000, limit: int | None = None,
               image_key: str | None = None, meta_columns: str = "all", keep_ext: bool = False,
               videos: bool = False, image_column: str | None = None, key_column: str | None = None) -> Input:
    """Resolve the input into units. Listed kinds (folders, lists, files) are listed now (key clashes are errors
    before any work); streamed kinds (shards, tables, datasets) are named, and read when their unit runs.
    `videos`: frames of videos are sampled (--num-frames, --fps, --max-frames); without it, a listed video file is
    refused."""
    if input_format not in input_formats():
        raise ConfigError("--input-format is not known", given=input_format, expected=" | ".join(input_formats()),
                          fix="pass --input-format auto")
    if isinstance(spec, os.PathLike):  # a pathlib.Path: the path it names
        spec = os.fspath(spec)
    opts = InputOptions(shard_size, limit, image_key, meta_columns, keep_ext, videos, image_column, key_column)
    kind = KINDS[detect_format(spec, opts) if input_format == "auto" else input_format]
    kind.check_options(spec, opts)
    return kind.open(spec, opts)
