"""Training on stored features: `FeatureDataset`, a torch Dataset over a feature file or an output folder (every
completed shard), and `collate_features`, which pads ragged token counts and returns a mask.

The dataset holds the path, the key list and, for an output folder, the folder as it was opened once (its keys
from the markers' index, `complete` and `broken_shards` of that moment); each process (the main one, every
DataLoader worker, under fork, spawn or forkserver) opens the shard files itself on its first item, so nothing
unpicklable (an h5py file, a safetensors handle) ever crosses a process boundary.

    >>> ds = s2cli.FeatureDataset("feats/")
    >>> dl = torch.utils.data.DataLoader(ds, batch_size=32, num_workers=4, collate_fn=s2cli.collate_features)
    >>> for batch in dl: batch["features"] (B, T, C), batch["mask"] (B, T) True on real tokens, batch["key"]
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .dtypes import QUANTIZED
from .errors import ConfigError
from .readers import FeatureSet, Reader, open_features, pick_layer
from .store import is_url

WHAT = ("features", "pooled")


class FeatureDataset(torch.utils.data.Dataset):
    """Items `{"key", "features", "meta"}` of the features written by `s2 extract` at `path` (a .h5 or
    .safetensors file, or an output folder), in input order. `what`: "features" (T, C) per image, or "pooled"
    (C,) (extracted with --pool). `keys`: a subset, in the order given. `dtype`: the torch dtype of the tensors
    (bfloat16 and float16 storage are decoded exactly into it; int8/float8 codes are dequantized, then cast).
    `meta`: each image's record (source, sizes, grid, the user's metadata, ...), as `open_features(path).meta(key)`
    gives it. `raw`: the stored codes as they are (int8; float8 and bfloat16 as their bits; `dtype` ignored), with
    int8/float8 `token_scales` and `channel_scales` in each item (value = code x both). `complete` and
    `broken_shards`: as `open_features(path)` says them (an output folder whose run is unfinished or has broken
    shards serves the rest). `layer`: of an output of several layers (--layers), the one to read, as
    `open_features` takes it (None: all, (L, T, C) or (L, C))."""

    def __init__(self, path: str | os.PathLike, what: str = "features", keys: Sequence[str] | None = None,
                 dtype: torch.dtype = torch.float32, meta: bool = True, raw: bool = False, layer: int | None = None):
        if what not in WHAT:
            raise ConfigError("FeatureDataset: `what` is not known", given=what, expected=" | ".join(WHAT),
                              fix="pass what='features' or what='pooled'")
        self.what, self.dtype, self.with_meta, self.raw, self.layer = what, dtype, meta, raw, layer
        self.path = str(path) if is_url(str(path)) else Path(path)  # a URL stays one (never a local path)
        r = open_features(self.path, raw=raw, layer=layer)
        try:
            known = list(r)
            if keys is not None:
                missing = [k for k in keys if k not in r]
                if missing:
                    raise ConfigError(f"{len(missing)} keys are not in {self.path}", given=missing[:5],
                                      fix="pass keys from `list(s2cli.open_features(path))`")
            self.feature_shape = r.feature_shape
            self.complete: bool = getattr(r, "complete", True)
            self.broken_shards: list[dict[str, Any]] = getattr(r, "broken_shards", [])
        except BaseException:
            r.close()
            raise
        self.keys = list(keys) if keys is not None else known
        # a folder is looked at once, here; a single file is opened again by each process (nothing to share)
        inner = getattr(r, "inner", r)  # a folder read at a layer (--layers): the folder itself
        self._folder: FeatureSet | None = inner if isinstance(inner, FeatureSet) else None
        if self._folder is None:
            r.close()
        self._owner = os.getpid()
        self._reader: Reader | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def reader(self) -> Reader:
        """This process's reader, opened on first use (a forked worker opens its own)."""
        if self._reader is None or self._pid != os.getpid():
            self._reader = (pick_layer(self._folder.forked(), self.layer) if self._folder is not None
                            else open_features(self.path, raw=self.raw, layer=self.layer))
            self._pid = os.getpid()
        return self._reader

    def __getitem__(self, i: int) -> dict[str, Any]:
        key = self.keys[i]
        r = self.reader()
        x = r[key] if self.what == "features" else r.pooled(key)
        t = torch.from_numpy(np.ascontiguousarray(x))
        item: dict[str, Any] = {"key": key, "features": t if self.raw else t.to(self.dtype)}
        if self.raw and self.what == "features" and r.dtype in QUANTIZED:
            item["token_scales"], item["channel_scales"] = (torch.from_numpy(s) for s in r.scales(key))
        item["meta"] = r.meta(key) if self.with_meta else {}
        return item

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_reader"], state["_pid"] = None, None  # each process opens its own
        return state

    def close(self) -> None:
        if self._reader is not None and self._pid == os.getpid():
            self._reader.close()
        self._reader = None
        if self._folder is not None and self._owner == os.getpid():
            self._folder.close()


def collate_features(items: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch of FeatureDataset items: `features` (B, T_max, C) zero-padded at the end of each image's tokens,
    `mask` (B, T_max) bool, True on real tokens, `lengths` (B,), `key` and `meta` as lists. Pooled items
    (C,) stack to (B, C) with an all-True mask (B, 1)."""
    feats = [it["features"] for it in items]
    if feats[0].dim() == 1:
        x = torch.stack(feats)
        return {"key": [it["key"] for it in items], "features": x, "mask": torch.ones(len(feats), 1, dtype=torch.bool),
                "lengths": torch.ones(len(feats), dtype=torch.long), "meta": [it["meta"] for it in items]}
    lengths = torch.tensor([f.shape[0] for f in feats], dtype=torch.long)
    x = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)
    mask = torch.arange(x.shape[1])[None, :] < lengths[:, None]
    return {"key": [it["key"] for it in items], "features": x, "mask": mask, "lengths": lengths,
            "meta": [it["meta"] for it in items]}
