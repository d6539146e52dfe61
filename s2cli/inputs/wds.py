"""WebDataset shards: brace patterns, globs and folders expanded to shard URLs; a tar read as keyed samples, a
broken stream one failure record."""
from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import ConfigError
from ..store import filesystem, local_of, open_url
from ..video import VIDEO_MEMBERS, require_av
from .kind import InputKind, InputOptions, where
from .samples import DEFAULT_IMAGE_KEY, IMAGE_EXTS, Sample
from .units import Input, Unit


def expand_shards(spec: str) -> list[str]:
    """Brace patterns, globs, a folder of .tar files, or `pipe:` commands -> the shard URLs, in order."""
    if spec.startswith("pipe:"):
        from braceexpand import braceexpand

        return list(braceexpand(spec))
    if local_of(spec) is None:
        return _expand_remote(spec)
    p = Path(spec)
    if p.is_dir():
        urls = sorted(str(x) for x in p.iterdir() if x.name.endswith(".tar") and x.is_file())
    else:
        from braceexpand import braceexpand

        urls = []
        for part in braceexpand(spec):
            urls.extend(sorted(glob.glob(part)) if glob.has_magic(part) else [part])
    return _checked_shards(urls, spec, os.path.exists, "check the pattern (quote braces in the shell: "
                           "'shards/{00000..00009}.tar')")


def _checked_shards(urls: list[str], spec: str, exists: Callable[[str], bool], fix: str) -> list[str]:
    """The expanded shards, each of which exists; else one line naming how many are missing (or that none match)."""
    missing = [u for u in urls if not exists(u)]
    if missing:
        raise ConfigError(f"{len(missing)} of {len(urls)} shards do not exist, e.g. {missing[0]}", given=spec, fix=fix)
    if not urls:
        raise ConfigError("no shards match", given=spec, fix="pass a brace pattern, a glob, or a folder of .tar files")
    return urls


def _expand_remote(spec: str) -> list[str]:
    """`expand_shards` for URLs: the brace pattern expanded as for local paths; globs and a folder of .tar listed,
    and every shard checked to exist, through the URL's file system."""
    from braceexpand import braceexpand

    fs, root = filesystem(spec)
    fs.invalidate_cache()
    if not glob.has_magic(spec) and "{" not in spec and not spec.endswith(".tar") and fs.isdir(root):
        urls = sorted(fs.unstrip_protocol(p) for p in fs.ls(root, detail=False) if p.endswith(".tar"))
    else:
        urls = []
        for part in braceexpand(spec):
            urls.extend(sorted(fs.unstrip_protocol(p) for p in fs.glob(filesystem(part)[1])) if glob.has_magic(part)
                        else [part])
    return _checked_shards(urls, spec, lambda u: fs.exists(filesystem(u)[1]), "check the URL and the pattern "
                           "(quote braces in the shell: 's3://b/{00000..00009}.tar')")


def _tar_stream(url: str, handler: Callable[[BaseException], bool]) -> Iterator[dict[str, Any]]:
    """The samples of one tar as webdataset groups them: a local path (or pipe:) through webdataset's own
    opener, a URL streamed through its fsspec file system."""
    from webdataset.tariterators import group_by_keys, tar_file_expander, tarfile_samples

    if local_of(url) is not None or url.startswith("pipe:"):
        yield from tarfile_samples([{"url": str(local_of(url) or url)}], handler=handler)
        return
    try:
        stream = open_url(url)
    except Exception as e:  # unreachable, refused, gone since it was listed: the unit's one failure
        handler(e)
        return
    with stream:
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}], handler=handler), handler=handler)


def tar_samples(url: str, image_key: str) -> Iterator[Sample | dict[str, str]]:
    errors: list[BaseException] = []

    def handler(exn: BaseException) -> bool:
        errors.append(exn)
        return True

    exts = [e.strip().lower() for e in image_key.split(";") if e.strip()]
    reported = False  # one broken stream is one failure, however many layers of the reader saw it

    def stream_failures() -> Iterator[dict[str, str]]:
        nonlocal reported
        while errors:
            exn = errors.pop(0)
            if isinstance(exn, ValueError) and "duplicate file name" in str(exn):
                continue  # a repeated member inside one sample: the first is kept, as with duplicate keys
            if not reported:
                reported = True
                yield _stream_failure(url, exn)

    for s in _tar_stream(url, handler):
        yield from stream_failures()
        key = s["__key__"]
        img_ext = next((e for e in exts if e in s), None)
        if img_ext is None:
            members = sorted(k for k in s if not k.startswith("__"))
            yield {"key": key, "source": f"{url}#{key}", "stage": "read", "error_class": "MissingImage",
                   "error": f"no image member ({'/'.join(exts)}); the sample has: {', '.join(members) or 'nothing'}"
                            + _dotted_names_hint(key, members)}
            continue
        meta: dict[str, Any] = {}
        if "json" in s:
            try:
                meta["json"] = json.loads(s["json"])
            except ValueError:
                meta["json"] = s["json"].decode("utf-8", "replace")
        if "txt" in s:
            meta["txt"] = s["txt"].decode("utf-8", "replace")
        yield Sample(key, f"{url}#{key}", data=s[img_ext], meta=json.dumps(meta) if meta else None)
    yield from stream_failures()


def _dotted_names_hint(key: str, members: list[str]) -> str:
    """Why members such as `img.001.jpg`, `img.002.jpg` make one sample without an image: WebDataset's rule."""
    dotted = [m for m in members if "." in m and m.lower().endswith(IMAGE_EXTS)]
    if not dotted:
        return ""
    return (f". WebDataset takes a sample's key up to the first dot of a member's name, so {key}.{dotted[0]} is member "
            f"{dotted[0]!r} of sample {key!r} (and files differing after that dot are one sample): name the files "
            f"without extra dots (e.g. {key}_{dotted[0]}), or pass --image-key {dotted[0]} to read that one")


def _stream_failure(url: str, exn: BaseException) -> dict[str, str]:
    msg = str(exn.args[0]) if exn.args else str(exn)
    return {"key": f"{Path(url).name}:<stream>", "source": url, "stage": "read", "error_class": type(exn).__name__,
            "error": f"reading the tar failed: {msg}"}



class WdsKind(InputKind):
    """WebDataset shards: a brace pattern, a glob, a folder of .tar files, pipe:CMD; one unit per tar, read when
    it runs; a local tar's identity is its size and modification time."""

    name = "wds"
    streamed = True
    takes = ("image_key",)
    why_not = {"keep_ext": "--keep-ext keeps file extensions in keys, and WebDataset keys (__key__) have none"}
    nothing_read_fix = ("read the failure records (`s2 inspect OUT --json` or OUTDIR/errors.jsonl); a MissingImage "
                        "record lists the sample's members: pass their image extension with --image-key")

    def detect(self, spec: Any, opts: InputOptions) -> bool:
        if not isinstance(spec, str):
            return False
        if spec.startswith("pipe:") or "{" in spec or spec.endswith(".tar") or glob.has_magic(spec):
            return True
        what, names = where(spec)
        return (what == "dir" and any(n.endswith(".tar") for n in names)
                and not any(n.lower().endswith(IMAGE_EXTS) for n in names))

    def open(self, spec: str, opts: InputOptions) -> Input:
        urls = expand_shards(spec)
        key = opts.image_key or (f"{DEFAULT_IMAGE_KEY};{VIDEO_MEMBERS}" if opts.videos else DEFAULT_IMAGE_KEY)
        if opts.videos:
            require_av()
        units = [Unit(i, u, url=u, image_key=key, kind=self) for i, u in enumerate(urls)]
        return self.input(spec, units, None, limit=opts.limit or None)

    def read(self, unit: Unit) -> Iterator[Sample | dict[str, str]]:
        yield from tar_samples(unit.url, unit.image_key)  # type: ignore[arg-type]

    def identity(self, unit: Unit) -> dict[str, Any] | None:
        """A local tar's size and modification time; None for pipe: and URLs."""
        if unit.url is None or unit.url.startswith("pipe:"):
            return None
        try:
            st = os.stat(unit.url)
        except OSError:
            return None
        return {"tar_bytes": st.st_size, "tar_mtime_ns": st.st_mtime_ns}
