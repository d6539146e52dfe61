"""Units of work and the resolved input: the numbered slices of a listed input, or one tar each."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator

from .samples import DEFAULT_IMAGE_KEY, Sample


@dataclass
class Unit:
    """One unit of work: a slice of a listed input (folder, list, files), or one streamed piece (a tar, a table's
    row group, a slice of a dataset) that its kind reads. Units are numbered in input order and do not depend on
    who processes them; each is cut into parts of at most `shard_size` samples."""

    index: int
    id: str
    _samples: list[Sample] | None = None
    url: str | None = None  # a streamed unit's file or URL (a tar, a table)
    image_key: str = DEFAULT_IMAGE_KEY  # wds
    kind: Any = None  # the InputKind that reads a streamed unit (`read`, `identity`)
    ref: Any = None  # what the kind needs besides `url` (a row group's number, a range of indices)
    rows: int | None = None  # a streamed unit's number of samples, when known without reading it

    @property
    def size(self) -> int | None:
        """A listed unit's number of samples; None for a streamed one (its keys are known once read)."""
        return None if self._samples is None else len(self._samples)

    @property
    def count(self) -> int | None:
        """The unit's number of samples when known up front (listed, or a table's row group)."""
        return self.size if self._samples is not None else self.rows

    def part_keys(self, part: int, shard_size: int) -> list[str] | None:
        """The keys of one part of a listed unit, in order ([] past its end), or of a streamed unit whose kind can
        tell them (a map-style dataset's: `InputKind.keys`); None for other streamed units (a tar)."""
        if self._samples is None:
            keys = self.kind.keys(self) if self.kind is not None else None
            return None if keys is None else keys[part * shard_size:(part + 1) * shard_size]
        return [s.key for s in self._samples[part * shard_size:(part + 1) * shard_size]]

    def identity(self) -> dict[str, Any] | None:
        """What tells a streamed unit's content apart without reading it (a tar: its size and modification time);
        None for a listed unit (its keys say it) and where the kind cannot tell (pipe:, a URL)."""
        return None if self._samples is not None or self.kind is None else self.kind.identity(self)

    def samples(self) -> Iterator[Sample | dict[str, str]]:
        """Samples in order; a dict instead of a Sample is a failure record (unreadable tar, missing image)."""
        if self._samples is not None:
            yield from self._samples
            return
        yield from self.kind.read(self)


@dataclass(frozen=True)
class Input:
    kind: str  # the kind's name (folder | list | wds | files | table | dataset | ...), as saved in run.json
    spec: str
    units: list[Unit]
    total: int | None  # number of samples when known without reading shards
    limit: int | None = None  # streamed units: only the first N samples, counted as they are read (--limit)
    streamed: bool = False  # units are read to learn their samples (shards, tables, datasets); else listed
    fix: str = ("read the failure records (`s2 inspect OUT --json` or OUTDIR/errors.jsonl): each says why its image "
                "failed")  # what to look at when every sample failed

    def fetch_ahead(self) -> None:
        """What the units need from the network, fetched now into the shared cache (`InputKind.fetch_ahead`)."""
        for unit in self.units:
            if unit.kind is not None:
                unit.kind.fetch_ahead(unit)

    def describe(self) -> dict[str, Any]:
        d = {"kind": self.kind, "spec": self.spec, "units": len(self.units), "total": self.total,
             "streamed": self.streamed}
        if "://" not in self.spec and not self.spec.startswith(("pipe:", "<")):
            d["path"] = os.path.abspath(self.spec)  # a resume may write the same local input another way
        return d
