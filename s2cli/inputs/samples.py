"""Samples: one keyed image (or video) of an input, where its bytes come from, its metadata; and the failure
record a sample that cannot be used becomes."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..store import open_url


def printable(text: str) -> str:
    """A file name's bytes that are not UTF-8 (kept by Python as lone surrogates) spelled as `\\xNN`, so keys
    and sources can be stored and printed; stable, so the same file always gets the same key."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
DEFAULT_IMAGE_KEY = "jpg;jpeg;png;webp"


@dataclass(frozen=True)
class Sample:
    key: str  # folder: path relative to the input without extension; list: `key` column; wds: __key__
    source: str  # where the bytes come from (a path, or "<tar url>#<key>")
    data: bytes | None = None  # the image bytes, when they come from a stream (wds); else read from `source`
    meta: str | None = None  # per-image metadata as JSON text (wds json/txt members, a list's extra columns)
    sidecars: tuple[str, ...] = ()  # `key.json` / `key.txt` beside a folder's image, read when it is decoded
    pixels: Any = None  # an image already in memory (a Python dataset's item: PIL, or uint8 array/tensor)

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



def failure(sample: Sample, stage: str, error: BaseException | str, error_class: str | None = None) -> dict[str, str]:
    """One failure record: which sample, where it came from, the stage that failed, and why."""
    return {"key": sample.key, "source": printable(sample.source), "stage": stage,
            "error_class": error_class or type(error).__name__, "error": str(error)}



def check_unique(pairs: list[tuple[str, str]], what: str) -> None:
    by_key: dict[str, list[str]] = {}
    for key, src in pairs:  # as stored: two names whose bytes differ can print alike (`caf\xe9`)
        by_key.setdefault(printable(key), []).append(src)
    clashes = {k: v for k, v in by_key.items() if len(v) > 1}
    if clashes:
        shown = "; ".join(f"{k}: {', '.join(printable(Path(p).name) for p in v)}" for k, v in list(clashes.items())[:5])
        more = f" (and {len(clashes) - 5} more)" if len(clashes) > 5 else ""
        raise ConfigError(f"{len(clashes)} keys are shared by several {what}: {shown}{more}",
                          expected="one file per key", fix="rename or remove one file of each pair")
