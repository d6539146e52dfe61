"""Folder inputs: every image and video under a folder (local or remote), keyed by its relative path, with
`key.json`/`key.txt` beside it as metadata."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..store import filesystem, local_of
from ..video import VIDEO_EXTS
from .kind import InputKind, InputOptions, where
from .samples import IMAGE_EXTS, Sample, check_unique
from .units import Input

COMPRESSED_TARS = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


def scan_folder(root: str | os.PathLike, keep_ext: bool = False) -> list[Sample]:
    """Every image and video (VIDEO_EXTS) under `root` (recursive, any-case extensions), sorted by relative path;
    its key is that path without the extension (with it: `keep_ext`), and `key.json` / `key.txt` beside it are its
    metadata. Two files with the same key (`a.jpg`, `a.png`) are an error listing all such pairs, raised before any
    work starts."""
    found = _walk(str(root)) if local_of(str(root)) is None else _walk_local(Path(local_of(root)))  # type: ignore[arg-type]
    found.sort()
    pairs = [(rel if keep_ext else rel.rsplit(".", 1)[0], full) for rel, full, _ in found]
    check_unique(pairs, "files (the path without its extension)")
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




class FolderKind(InputKind):
    name = "folder"
    takes = ("keep_ext",)

    def detect(self, spec: Any, opts: InputOptions) -> bool:
        return isinstance(spec, str) and where(spec)[0] == "dir"

    def open(self, spec: str, opts: InputOptions) -> Input:
        return self.listed(spec, scan_folder(spec, opts.keep_ext), opts)

