"""What an input kind is: one record per kind (folder, list, WebDataset, files, tables, a Python dataset) that
detects its inputs, lists them into units (with the content identity a resume compares), reads a streamed unit's
samples, and says what to look at when nothing could be read. The registry (`resolve.py`) asks the records;
nothing outside the `inputs` package compares kind names."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import ConfigError
from ..store import filesystem, local_of
from ..video import VIDEO_EXTS, require_av
from .samples import Sample, printable
from .units import Input, Unit

NOTHING_READ_FIX = "read the failure records (`s2 inspect OUT --json` or OUTDIR/errors.jsonl): each says why its image failed"


@dataclass(frozen=True)
class InputOptions:
    """The settings every kind is opened with (the `s2 extract` input options)."""

    shard_size: int = 1000
    limit: int | None = None
    image_key: str | None = None  # WebDataset: the image members' extensions
    meta_columns: str = "all"  # lists, tables: the extra columns kept as metadata
    keep_ext: bool = False  # keys keep the file's extension (folders, lists, files)
    videos: bool = False  # a frame sampling was given
    image_column: str | None = None  # tables: the column holding the image (bytes, a path, an HF Image struct)
    key_column: str | None = None  # tables: the column holding the key


# what a kind says when given an option it does not take: (the option's flag, what it is for, the fix)
_OPTION_USE = {
    "meta_columns": ("--meta-columns", "picks the columns of a .csv/.parquet list or a table",
                     "drop --meta-columns (folders read key.json/key.txt beside each image, shards their json/txt "
                     "members)"),
    "keep_ext": ("--keep-ext", "keeps file extensions in keys", "drop --keep-ext"),
    "image_key": ("--image-key", "names WebDataset image members", "drop --image-key"),
    "image_column": ("--image-column", "names a table's image column", "drop --image-column"),
    "key_column": ("--key-column", "names a table's key column", "drop --key-column"),
}
_DEFAULTS = InputOptions()


class InputKind:
    """One kind of input. `streamed`: its units are read to learn their samples (keys, counts), as tars are;
    else every sample is listed up front (keys known, a part's identity is its keys). `takes`: the options it
    reads beyond the common ones (see _OPTION_USE); others are refused in one line."""

    name = ""
    streamed = False
    takes: tuple[str, ...] = ()
    nothing_read_fix = NOTHING_READ_FIX
    why_not: dict[str, str] = {}  # an option it refuses -> why, in its own words (else the option's use is said)

    def detect(self, spec: Any, opts: InputOptions) -> bool:
        """Whether `spec` is this kind's (auto-detection asks the kinds in registration order)."""
        return False

    def open(self, spec: Any, opts: InputOptions) -> Input:
        raise NotImplementedError

    def read(self, unit: Unit) -> Iterator[Sample | dict[str, str]]:
        """A streamed unit's samples in order (a dict is a failure record)."""
        raise NotImplementedError

    def identity(self, unit: Unit) -> dict[str, Any] | None:
        """What tells a streamed unit's content apart without reading it (compared on resume); None: unknown."""
        return None

    def fetch_ahead(self, unit: Unit) -> None:
        """Fetch now what reading the unit needs from the network, into a cache every process of this node reads (a
        hub dataset's file): `--devices` workers run offline."""

    def keys(self, unit: Unit) -> list[str] | None:
        """A streamed unit's keys in order, where the kind can tell them without decoding (a map-style dataset's):
        its parts are then identified by their keys on resume, as a listed unit's are; None: by `identity`."""
        return None

    def check_options(self, spec: Any, opts: InputOptions) -> None:
        for name, (flag, use, fix) in _OPTION_USE.items():
            if name not in self.takes and getattr(opts, name) != getattr(_DEFAULTS, name):
                why = self.why_not.get(name) or f"{flag} {use}"
                raise ConfigError(why, given=f"{self.name} input {spec}", fix=fix)

    def input(self, spec: str, units: list[Unit], total: int | None, limit: int | None = None) -> Input:
        return Input(self.name, spec, units, total, limit=limit, streamed=self.streamed, fix=self.nothing_read_fix)

    def listed(self, spec: str, samples: list[Sample], opts: InputOptions) -> Input:
        """An input whose samples are all listed: the first --limit, videos checked, cut into units of
        `shard_size` samples."""
        if opts.limit:
            samples = samples[:opts.limit]
        check_videos(samples, opts.videos)
        S = opts.shard_size
        units = [Unit(i, f"{self.name}[{s}:{s + len(samples[s:s + S])}]", samples[s:s + S])
                 for i, s in enumerate(range(0, len(samples), S))]
        return self.input(spec, units, len(samples))


def check_videos(samples: list[Sample], videos: bool) -> None:
    """Listed video files (by name) need PyAV and a frame sampling, said before any work starts."""
    named = [s for s in samples if s.source.lower().endswith(VIDEO_EXTS)]
    if not named:
        return
    require_av()
    if not videos:
        raise ConfigError(f"the input holds {len(named)} video file(s) (e.g. {printable(named[0].source)}) and no "
                          "frame sampling was given", expected="--num-frames N, --fps F or --max-frames M",
                          fix="add e.g. --num-frames 8 (docs/video.md)")


def where(spec: str) -> tuple[str | None, list[str]]:
    """("dir", the names in it) / ("file", []) / (None, []) for a local path or a URL."""
    local = local_of(spec)
    if local is not None:
        p = Path(local)
        if p.is_dir():
            return "dir", [x.name for x in p.iterdir()]
        return ("file" if p.exists() else None), []
    fs, path = filesystem(spec)
    fs.invalidate_cache()
    if fs.isdir(path):
        return "dir", [n.rsplit("/", 1)[-1] for n in fs.ls(path, detail=False)]
    return ("file" if fs.exists(path) else None), []
