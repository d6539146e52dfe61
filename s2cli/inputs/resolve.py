"""Resolving an input spec: its kind detected (or given), listed into units, its options checked."""
from __future__ import annotations

import glob
from pathlib import Path

from ..errors import ConfigError
from ..store import filesystem, local_of
from ..video import VIDEO_EXTS, VIDEO_MEMBERS, require_av
from .listing import read_list, scan_folder
from .samples import DEFAULT_IMAGE_KEY, IMAGE_EXTS, Sample, printable
from .units import Input, Unit
from .wds import expand_shards

INPUT_FORMATS = ("auto", "folder", "list", "wds")
# what to look at when every sample of an input failed, by the kind of input
NOTHING_READ_FIX = {
    "folder": "read the failure records (`s2 inspect OUT --json` or OUTDIR/errors.jsonl): each says why its image failed",
    "list": "read the failure records (`s2 inspect OUT --json` or OUTDIR/errors.jsonl); relative paths in a .txt list "
            "resolve against the list's folder",
    "wds": "read the failure records (`s2 inspect OUT --json` or OUTDIR/errors.jsonl); a MissingImage record lists "
           "the sample's members: pass their image extension with --image-key",
}



def detect_format(spec: str) -> str:
    if spec.startswith("pipe:") or "{" in spec or spec.endswith(".tar") or glob.has_magic(spec):
        return "wds"
    if local_of(spec) is None:
        return _detect_remote(spec)
    p = Path(local_of(spec))  # type: ignore[arg-type]
    if p.is_file() and p.suffix.lower() in (".txt", ".csv", ".parquet"):
        return "list"
    if p.is_dir():
        if any(x.name.endswith(".tar") for x in p.iterdir()) and not any(
                x.name.lower().endswith(IMAGE_EXTS) for x in p.iterdir()):
            return "wds"
        return "folder"
    if not p.exists():
        raise ConfigError("input does not exist", given=spec, fix="pass an existing folder, list or shards")
    raise ConfigError("cannot tell what kind of input this is", given=spec,
                      expected="a folder, a .txt/.csv/.parquet list, or .tar shards",
                      fix="pass --input-format folder|list|wds")


def _detect_remote(url: str) -> str:
    """`detect_format` for a URL, asked of its file system."""
    fs, path = filesystem(url)
    fs.invalidate_cache()
    if url.lower().endswith((".txt", ".csv", ".parquet")) and fs.isfile(path):
        return "list"
    if fs.isdir(path):
        names = [n.rsplit("/", 1)[-1] for n in fs.ls(path, detail=False)]
        if any(n.endswith(".tar") for n in names) and not any(n.lower().endswith(IMAGE_EXTS) for n in names):
            return "wds"
        return "folder"
    if not fs.exists(path):
        raise ConfigError("input does not exist", given=url, fix="pass an existing folder, list or shards")
    raise ConfigError("cannot tell what kind of input this is", given=url,
                      expected="a folder, a .txt/.csv/.parquet list, or .tar shards",
                      fix="pass --input-format folder|list|wds")


def open_input(spec: str, input_format: str = "auto", shard_size: int = 1000, limit: int | None = None,
               image_key: str | None = None, meta_columns: str = "all", keep_ext: bool = False,
               videos: bool = False) -> Input:
    """Resolve the input into units. Folders and lists are listed now (key clashes are errors before any work);
    shards are only named, and read when their unit runs. `videos`: frames of videos are sampled (--num-frames,
    --fps, --max-frames; shards then also read video members); without it, a listed video file is refused."""
    if input_format not in INPUT_FORMATS:
        raise ConfigError("--input-format is not known", given=input_format, expected=" | ".join(INPUT_FORMATS),
                          fix="pass --input-format auto")
    kind = detect_format(spec) if input_format == "auto" else input_format
    if meta_columns != "all" and kind != "list":
        raise ConfigError("--meta-columns picks the columns of a .csv/.parquet list", given=f"{kind} input {spec}",
                          fix="drop --meta-columns (folders read key.json/key.txt beside each image, shards their "
                              "json/txt members)")
    if keep_ext and kind == "wds":
        raise ConfigError("--keep-ext keeps file extensions in keys, and WebDataset keys (__key__) have none",
                          given=spec, fix="drop --keep-ext")
    if kind == "wds":
        urls = expand_shards(spec)
        key = image_key or (f"{DEFAULT_IMAGE_KEY};{VIDEO_MEMBERS}" if videos else DEFAULT_IMAGE_KEY)
        if videos:
            require_av()
        units = [Unit(i, u, url=u, image_key=key) for i, u in enumerate(urls)]
        return Input(kind, spec, units, None, limit=limit or None)
    samples = scan_folder(spec, keep_ext) if kind == "folder" else read_list(spec, meta_columns, keep_ext)
    if limit:
        samples = samples[:limit]
    _check_videos(samples, videos)
    units = [Unit(i, f"{kind}[{s}:{s + len(samples[s:s + shard_size])}]", samples[s:s + shard_size])
             for i, s in enumerate(range(0, len(samples), shard_size))]
    return Input(kind, spec, units, len(samples))


def _check_videos(samples: list[Sample], videos: bool) -> None:
    """Listed video files (by name) need PyAV and a frame sampling, said before any work starts."""
    named = [s for s in samples if s.source.lower().endswith(VIDEO_EXTS)]
    if not named:
        return
    require_av()
    if not videos:
        raise ConfigError(f"the input holds {len(named)} video file(s) (e.g. {printable(named[0].source)}) and no "
                          "frame sampling was given", expected="--num-frames N, --fps F or --max-frames M",
                          fix="add e.g. --num-frames 8 (docs/video.md)")

