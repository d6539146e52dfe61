"""Python datasets as inputs: a torch `Dataset` (map-style: `len` and `[i]`) or `IterableDataset`, or a
`datasets.Dataset`. An item is a PIL image, a uint8 array or tensor (H, W, 3), (3, H, W) or (H, W), encoded image
bytes, an HF `Image` struct {bytes, path} (`Image(decode=False)`), a path, a (image, target) pair, or a dict holding
one of these (its `key`/`__key__`/`id` the key, its other plain values the metadata). Keys come from the item, else
from the index. Map-style datasets are cut into units of `shard_size` indices, each identified by the keys at its
indices (`keys`): a resume skips a done unit whose keys are the same and redoes one whose keys changed, so features
never stay under a key the dataset no longer holds there. An iterable dataset is one unit."""
from __future__ import annotations

import json
import os
from typing import Any, Iterator

from ..errors import ConfigError
from .kind import InputKind, InputOptions
from .samples import Sample
from .units import Input, Unit

IMAGE_FIELDS = ("image", "img", "jpg", "png", "pixels", "pixel_values")
KEY_FIELDS = ("key", "__key__", "id")


def spec_of(ds: Any) -> str:
    """How a dataset object is named in run.json (a resume compares it): its type (not its length: a dataset that
    grew resumes by its keys)."""
    return f"<{type(ds).__module__}.{type(ds).__qualname__}>"


def is_map_style(ds: Any) -> bool:
    try:
        from torch.utils.data import IterableDataset

        if isinstance(ds, IterableDataset):
            return False
    except ImportError:  # pragma: no cover
        pass
    return hasattr(ds, "__getitem__") and hasattr(ds, "__len__")


class DatasetKind(InputKind):
    name = "dataset"
    streamed = True

    def detect(self, spec: Any, opts: InputOptions) -> bool:
        return not isinstance(spec, (str, os.PathLike)) and (is_map_style(spec) or hasattr(spec, "__iter__"))

    def open(self, spec: Any, opts: InputOptions) -> Input:
        if isinstance(spec, (str, os.PathLike)):
            raise ConfigError("--input-format dataset reads a Python dataset passed to s2cli.extract, not a path",
                              given=str(spec), fix="pass --input-format auto (or the path's own kind)")
        name = spec_of(spec)
        if not is_map_style(spec):
            return self.input(name, [Unit(0, "dataset[iter]", kind=self, ref=(spec, None, "index", {}))], None,
                              limit=opts.limit or None)
        n = len(spec) if not opts.limit else min(len(spec), opts.limit)
        keyed = "index"
        if n:
            first = spec[0]
            item_sample(first, 0, strict=True)  # an unusable item is refused before any work
            keyed = key_source(spec, first)
        S = opts.shard_size
        units = [Unit(i, f"dataset[{s}:{min(n, s + S)}]", kind=self, ref=(spec, range(s, min(n, s + S)), keyed, {}),
                     rows=min(n, s + S) - s) for i, s in enumerate(range(0, n, S))]
        return self.input(name, units, n)

    def read(self, unit: Unit) -> Iterator[Sample | dict[str, str]]:
        ds, indices = unit.ref[:2]
        if indices is None:
            for i, item in enumerate(ds):
                yield item_sample(item, i)
            return
        seen: list[str] = []
        for i in indices:
            try:
                item = ds[i]
            except Exception as e:  # the dataset's own failure: this item's record
                seen.append(f"{i:08d}")
                yield {"key": f"{i:08d}", "source": f"<dataset>#{i}", "stage": "read", "error_class": type(e).__name__,
                       "error": f"dataset[{i}] raised: {e}"}
                continue
            s = item_sample(item, i)
            seen.append(s.key if isinstance(s, Sample) else s["key"])
            yield s
        unit.ref[3]["keys"] = seen  # what this run read: the keys its done marker records, without reading again

    def keys(self, unit: Unit) -> list[str] | None:
        """The keys at a map-style unit's indices, in order: as this run read them, else a `datasets.Dataset`'s key
        columns alone (no image decoded), the items' own keys (each item read), or the indices."""
        ds, indices, keyed, memo = unit.ref
        if indices is None:
            return None
        if "keys" in memo:
            return memo["keys"]
        if keyed == "index":
            return [f"{i:08d}" for i in indices]
        if isinstance(keyed, tuple):  # a datasets.Dataset's key columns
            rows = ds.select_columns(list(keyed))[indices.start:indices.stop]
            return [key_of(rows, j, i) for j, i in enumerate(indices)]
        out = []
        for i in indices:
            try:
                out.append(item_key(ds[i], i))
            except Exception:  # read() records this item's failure under its index
                out.append(f"{i:08d}")
        return out


def key_source(ds: Any, first: Any) -> str | tuple[str, ...]:
    """Where a map-style dataset's keys come from: a `datasets.Dataset`'s key columns (read without the images),
    "items" (dict items holding a key), or "index"."""
    columns = getattr(ds, "column_names", None)
    if isinstance(columns, list) and hasattr(ds, "select_columns"):
        present = tuple(k for k in KEY_FIELDS if k in columns)
        return present or "index"
    return "items" if isinstance(first, dict) and any(first.get(k) not in (None, "") for k in KEY_FIELDS) else "index"


def item_key(item: Any, index: int) -> str:
    """An item's key: a dict's first non-empty `key`/`__key__`/`id`, else its index (`00000012`)."""
    if isinstance(item, dict):
        return next((str(item[k]) for k in KEY_FIELDS if item.get(k) not in (None, "")), f"{index:08d}")
    return f"{index:08d}"


def key_of(rows: dict[str, list[Any]], j: int, index: int) -> str:
    """Row `j` of a slice of key columns: the key its item would give (`item_key`)."""
    return item_key({k: v[j] for k, v in rows.items()}, index)


def item_sample(item: Any, index: int, strict: bool = False) -> Sample | dict[str, str]:
    """One dataset item -> a Sample; an item holding no usable image -> a failure record (`strict`: a ConfigError,
    the one-line refusal of a dataset whose first item is unusable)."""
    key, meta = item_key(item, index), None
    image = item
    if isinstance(item, dict):
        field = next((k for k in IMAGE_FIELDS if k in item), None)
        if field is None:
            field = next((k for k, v in item.items() if _usable(v)), None)
        image = item.get(field) if field is not None else None
        plain = {k: _plain(v) for k, v in item.items() if k != field and k not in KEY_FIELDS}
        meta = json.dumps({k: v for k, v in plain.items() if v is not _SKIP}) if plain else None
    elif isinstance(item, (tuple, list)) and len(item) == 2 and _usable(item[0]):  # (image, target)
        image, target = item
        t = _plain(target)
        meta = json.dumps({"target": t}) if t is not _SKIP else None
    source = f"<dataset>#{index}"
    if _struct(image):  # an HF Image struct (`Image(decode=False)`): its bytes, else its path
        image = image["bytes"] if image.get("bytes") is not None else image.get("path")
    if isinstance(image, (bytes, bytearray)):
        return Sample(key, source, data=bytes(image), meta=meta)
    if isinstance(image, (str, os.PathLike)):
        return Sample(key, os.fspath(image), meta=meta)
    if _usable(image):
        return Sample(key, source, meta=meta, pixels=image)
    why = (f"dataset item {index} holds no image: got {type(item).__name__}"
           + (f" with fields {', '.join(map(str, item))}" if isinstance(item, dict) else ""))
    if strict:
        raise ConfigError(why, expected="a PIL image, a uint8 array/tensor (H, W, 3) or (3, H, W), encoded bytes, "
                                        "a path, or a dict holding one (with `key` and metadata)",
                          fix="return one of these from the dataset's __getitem__ (e.g. without the ToTensor/"
                              "Normalize transforms: s2cli fits and normalizes itself)")
    return {"key": key, "source": source, "stage": "read", "error_class": "UnusableItem", "error": why}


def _usable(v: Any) -> bool:
    """An image s2cli can take: PIL, bytes, an HF Image struct {bytes, path}, or uint8 pixels (array or tensor) of 2
    or 3 dimensions."""
    if isinstance(v, (bytes, bytearray)) or _struct(v):
        return True
    if hasattr(v, "getbands"):  # PIL
        return True
    dtype = str(getattr(v, "dtype", ""))
    return dtype in ("uint8", "torch.uint8") and getattr(v, "ndim", 0) in (2, 3)


def _struct(v: Any) -> bool:
    """An HF `Image` struct as `datasets` gives it undecoded: {"bytes": ..., "path": ...}, one of them set."""
    return (isinstance(v, dict) and set(v) == {"bytes", "path"}
            and (isinstance(v["bytes"], (bytes, bytearray)) or isinstance(v["path"], str) and bool(v["path"])))


_SKIP = object()


def _plain(v: Any) -> Any:
    """A metadata value as JSON (numbers, strings, lists, scalar tensors); images and arrays are left out."""
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        return v.item()
    if isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float, bool)) for x in v):
        return list(v)
    return _SKIP
