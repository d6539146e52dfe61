"""Single files and globs of them: `photo.jpg`, `clip.mp4`, `'photos/**/*.png'` (recursive with `**`). Keys as a
folder's: the path (below the pattern's fixed folder) without its extension."""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..video import VIDEO_EXTS
from .kind import InputKind, InputOptions
from .samples import IMAGE_EXTS, Sample, check_unique
from .units import Input

MEDIA_EXTS = IMAGE_EXTS + VIDEO_EXTS


class FilesKind(InputKind):
    name = "files"
    takes = ("keep_ext",)

    def detect(self, spec: Any, opts: InputOptions) -> bool:
        if not isinstance(spec, str) or spec.startswith("pipe:") or "://" in spec:
            return False
        if glob.has_magic(spec):
            found = matches(spec)
            return bool(found) and all(p.lower().endswith(MEDIA_EXTS) for p in found)
        return spec.lower().endswith(MEDIA_EXTS) and os.path.isfile(spec)

    def open(self, spec: str, opts: InputOptions) -> Input:
        if glob.has_magic(spec):
            paths = sorted(p for p in matches(spec) if p.lower().endswith(MEDIA_EXTS))
            base = fixed_folder(spec)
        else:
            paths, base = [spec], os.path.dirname(spec)
        if not paths:
            raise ConfigError("no image or video file matches the pattern", given=spec,
                              expected="files ending in " + ", ".join(MEDIA_EXTS),
                              fix="check the pattern (quote it in the shell: 'photos/**/*.png')")
        rels = [Path(os.path.relpath(p, base or ".")).as_posix() for p in paths]
        pairs = [(r if opts.keep_ext else r.rsplit(".", 1)[0], p) for r, p in zip(rels, paths)]
        check_unique(pairs, "files (the path without its extension)")
        return self.listed(spec, [Sample(k, p, sidecars=sidecars(p)) for k, p in pairs], opts)


def matches(pattern: str) -> list[str]:
    """The regular files a pattern names (`**` recursive), hidden ones left out as a folder's are."""
    return [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p) and not os.path.basename(p).startswith(".")]


def fixed_folder(pattern: str) -> str:
    """The folder a pattern's matches are under: its leading parts without wildcards."""
    parts = Path(pattern).parts
    fixed = [p for p in parts[:next(i for i, p in enumerate(parts) if glob.has_magic(p))]]
    return str(Path(*fixed)) if fixed else ""


def sidecars(path: str) -> tuple[str, ...]:
    """`name.json` / `name.txt` beside a file, read as its metadata (as a folder's files are)."""
    stem = path.rsplit(".", 1)[0]
    return tuple(f"{stem}{ext}" for ext in (".json", ".txt") if os.path.isfile(f"{stem}{ext}"))
