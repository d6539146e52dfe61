"""What is stored per image: the `StoredItem` the run hands a writer, the per-image attributes declared once
(`ATTRS`: every sink, reader, `to_hf_dataset` and `s2 inspect` loop over it), what a shard holds (`Layout`), and
the one place an image's `meta` JSON is read and written."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

import numpy as np


def meta_loads(text: str | None) -> Any:
    """An image's metadata from its stored JSON text ("" or None: none)."""
    return json.loads(text) if text else None


def meta_dumps(meta: Any) -> str | None:
    """An image's metadata as stored JSON text (None: none)."""
    return None if meta is None else json.dumps(meta)


def meta_with(text: str | None, **fields: Any) -> str:
    """Metadata JSON text with `fields` set at its top level (e.g. a video's `video` facts)."""
    m = meta_loads(text) or {}
    m.update(fields)
    return json.dumps(m)


@dataclass(frozen=True)
class Attr:
    """One per-image attribute. `kind`: "text" (a string), "json" (JSON text, read back parsed) or "int" (an integer
    array of `shape` per image; "S" stands for the number of scales or views). `when`: the `Layout` flag without
    which it is not stored (None: always). `sparse`: left out of an image's record when empty (0, "", None)."""

    name: str
    kind: str
    doc: str
    shape: tuple[Any, ...] = ()
    int_dtype: str = "int32"
    when: str | None = None
    sparse: bool = False

    def stored(self, item: StoredItem) -> Any:
        """The value a format stores: text ("" for none), or a list / int."""
        v = getattr(item, self.name)
        if self.kind in ("text", "json"):
            return v or ""
        return np.asarray(v, dtype=self.int_dtype).tolist()

    def read(self, v: Any) -> Any:
        """The value a reader gives back from what was stored (JSON parsed, arrays as lists)."""
        if isinstance(v, bytes):
            v = v.decode()
        if isinstance(v, (np.ndarray, np.generic)):
            v = v.tolist()
        return meta_loads(v) if self.kind == "json" else (v or "") if self.kind == "text" else v

    def shape_for(self, num_scales: int) -> tuple[int, ...]:
        return tuple(num_scales if d == "S" else d for d in self.shape)


# every per-image attribute, once: name, kind, what it holds
ATTRS: tuple[Attr, ...] = (
    Attr("source", "text", "where the image was read from (path, URL, tar#member)"),
    Attr("meta", "json", "the image's own metadata (a list's columns, a WebDataset sample's json/txt, video facts)"),
    Attr("orig_hw", "int", "the image's size as decoded (height, width)", (2,)),
    Attr("grid_hw", "int", "the output token grid (height, width)", (2,)),
    Attr("img_sizes", "int", "each scale's (or view's canvas) size; (0, 0) for an absent view", ("S", 2)),
    Attr("num_prefix_tokens", "int", "prefix (CLS) tokens before the grid", (), "int16"),
    Attr("split_mode", "text", "how the scales were cut into tiles (resize | pad)"),
    Attr("plan", "json", "a dynamic-resolution strategy's plan and output maps", when="plans", sparse=True),
    Attr("reduce", "json", "the token reduction (op, grid_before, grid_hw)", when="reduced", sparse=True),
    Attr("frames", "int", "a video entry's frame count (its features are (frames, T, C)); 0 for an image",
         when="videos", sparse=True),
)
ATTR = {a.name: a for a in ATTRS}
# read back from `meta`'s video facts and put at the top of a record (a video entry's, or one stored frame's)
VIDEO_FIELDS = ("frame_indices", "timestamps")
FRAME_FIELDS = ("frame_index", "timestamp")


@dataclass(frozen=True)
class StoredItem:
    """One stored entry: its key, its per-image attributes (`ATTRS`) and arrays: features (T, C) or a video's
    (F, T, C), None with --pool-only; pooled (C,) or None."""

    key: str
    source: str
    meta: str | None  # JSON text (see meta_loads)
    orig_hw: tuple[int, int]
    grid_hw: tuple[int, int]
    img_sizes: list[Any]
    num_prefix_tokens: int
    split_mode: str
    features: np.ndarray | None = None
    pooled: np.ndarray | None = None
    plan: str | None = None
    reduce: str | None = None

    @property
    def frames(self) -> int:
        """A video entry's frame count; 0 for an image."""
        f = self.features
        return int(f.shape[0]) if f is not None and f.ndim == 3 else 0

    @property
    def nbytes(self) -> int:
        return sum(getattr(a, "nbytes", 0) for a in (self.features, self.pooled))

    def replace(self, **changes: Any) -> StoredItem:
        return replace(self, **changes)

    def with_meta(self, **fields: Any) -> StoredItem:
        """This entry with `fields` set in its metadata."""
        return replace(self, meta=meta_with(self.meta, **fields))


@dataclass(frozen=True)
class Layout:
    """What every entry of a shard holds, fixed when its sink opens: channels (after a reduction), scales or views,
    tokens per entry (None: they vary, the ragged layout), the stored dtype, and which arrays and optional
    attributes are there."""

    channels: int
    num_scales: int
    tokens: int | None
    dtype: str
    features: bool = True
    pooled: bool = False
    pooled_channels: int | None = None  # before a space-to-channel reduction; None: `channels`
    plans: bool = False
    reduced: bool = False
    videos: bool = False

    def attrs(self) -> tuple[Attr, ...]:
        """The attributes a shard of this layout stores."""
        return tuple(a for a in ATTRS if a.when is None or getattr(self, a.when))

    @property
    def pooled_width(self) -> int:
        return self.pooled_channels or self.channels


def record(key: str, values: dict[str, Any]) -> dict[str, Any]:
    """A reader's record of one image from its stored attribute values (by name): `key`, every attribute read back
    (sparse ones only when set), and a video's frame indices and timestamps lifted from `meta`."""
    rec: dict[str, Any] = {"key": key}
    for a in ATTRS:
        if a.name in values:
            v = a.read(values[a.name])
            if not (a.sparse and not v):
                rec[a.name] = v
        elif not a.sparse:
            rec[a.name] = None
    video = rec["meta"].get("video") if isinstance(rec.get("meta"), dict) else None
    if isinstance(video, dict):
        fields = VIDEO_FIELDS if VIDEO_FIELDS[0] in video else FRAME_FIELDS
        rec.update({f: video.get(f) for f in fields})
    return rec
