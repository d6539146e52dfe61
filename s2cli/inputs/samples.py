"""Samples: one keyed image (or video) of an input, where its bytes come from, its metadata; and the failure
record a sample that cannot be used becomes."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

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

