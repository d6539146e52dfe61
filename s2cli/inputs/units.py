"""Units of work and the resolved input: the numbered slices of a listed input, or one tar each."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator

from .samples import DEFAULT_IMAGE_KEY, Sample
from .wds import tar_samples


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
        yield from tar_samples(self.url, self.image_key)  # type: ignore[arg-type]


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

