"""`hf://datasets/ORG/NAME[@REVISION][/PATH]` as a table input: the revision pinned to its commit, the repo's .parquet files
listed through huggingface_hub's file system (`HfFileSystem`: each file's path, size and content id), a file's
footer read by range requests until it is cached, and the file downloaded into the HF cache (`hf_hub_download`,
as model weights are: shared by ranks, reruns and resumes) when a unit first reads it. The listing is kept beside
the cache, so an offline run (HF_HUB_OFFLINE=1) reads the same files from the cache, or says which are missing."""
from __future__ import annotations

import fnmatch
import glob
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from ..errors import ConfigError
from ..hub import cache_dir, endpoint, offline, timeout

PREFIX = "hf://datasets/"
SHA_RE = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class HubFile:
    """One .parquet file of a dataset repo at one commit; `etag`: its content id, as the HF cache names its blob
    (an LFS file's sha256, else its git blob id)."""

    repo: str
    sha: str
    path: str
    size: int
    etag: str

    @property
    def url(self) -> str:
        return f"{PREFIX}{self.repo}@{self.sha}/{self.path}"

    def cached(self) -> str | None:
        """The file's path in the HF cache, or None before it is downloaded (no network)."""
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(self.repo, self.path, cache_dir=str(cache_dir()), revision=self.sha,
                                     repo_type="dataset")
        return hit if isinstance(hit, str) else None

    def fetch(self) -> str:
        """The file in the HF cache, downloaded now if it is not there yet (one process at a time per file: the
        others wait for it, then read the cache)."""
        hit = self.cached()
        if hit is not None:
            return hit
        if offline():
            raise ConfigError(f"{self.path} of the hub dataset is not in the HF cache {cache_dir()} and "
                              "HF_HUB_OFFLINE=1", given=self.url, fix=download_fix(self.repo))
        from huggingface_hub import hf_hub_download

        try:
            return hf_hub_download(self.repo, self.path, repo_type="dataset", revision=self.sha,
                                   cache_dir=str(cache_dir()), endpoint=endpoint(), etag_timeout=timeout())
        except Exception as e:
            raise hub_error(e, self.url) from None

    def open(self) -> Any:
        """A file object to read the footer (row groups, schema) from: the cached file, else range requests."""
        hit = self.cached()
        if hit is not None:
            return hit
        if offline():
            return self.fetch()  # says it is missing
        return file_system().open(self.url.removeprefix("hf://"), "rb")


def parse(spec: str) -> tuple[str, str | None, str]:
    """`hf://datasets/ORG/NAME[@REVISION][/PATH]` -> (ORG/NAME, REVISION or None, PATH or ""). PATH picks the
    .parquet files of a file, a folder or a glob inside the repo; a REVISION holding slashes (`refs/convert/parquet`,
    `refs/pr/1`) is written as is or with %2F, as HfFileSystem writes it."""
    parts = spec.removeprefix(PREFIX).strip("/").split("/")
    name, at, revision = (parts[1] if len(parts) > 1 else "").partition("@")
    rest = parts[2:]
    if revision == "refs" and len(rest) >= 2:  # refs/convert/parquet, refs/pr/1
        revision, rest = "/".join([revision, *rest[:2]]), rest[2:]
    if len(parts) < 2 or not parts[0] or not name or (at and not revision):
        raise ConfigError("not a hub dataset URL", given=spec, expected="hf://datasets/ORG/NAME[@REVISION][/PATH]",
                          fix="name the dataset repo as on the hub, e.g. hf://datasets/org/name@main")
    return f"{parts[0]}/{name}", unquote(revision) or None, "/".join(rest)


def picked(files: list[HubFile], inner: str) -> list[HubFile]:
    """The files a PATH inside the repo names: that file, the files below that folder, or those its glob matches."""
    if not inner:
        return files
    if glob.has_magic(inner):
        return [f for f in files if fnmatch.fnmatchcase(f.path, inner)]
    return [f for f in files if f.path == inner or f.path.startswith(inner.rstrip("/") + "/")]


def file_system() -> Any:
    from huggingface_hub import HfFileSystem

    return HfFileSystem(endpoint=endpoint())


def list_files(spec: str) -> list[HubFile]:
    """The .parquet files of the dataset at its revision's commit (those PATH names), in path order: asked from the
    hub (the commit's listing recorded beside the cache), or offline the recorded listing (else the cached
    snapshot's files)."""
    repo, revision, inner = parse(spec)
    if offline():
        files = _offline(spec, repo, revision)
    else:
        files = _online(spec, repo, revision)
    files = picked(files, inner)
    if not files and offline():
        raise ConfigError("the hub dataset has no .parquet files" + (f" at {inner}" if inner else "") + " in the HF "
                          "cache and HF_HUB_OFFLINE=1", given=spec, fix=download_fix(repo))
    if not files:
        raise ConfigError("the hub dataset holds no .parquet files" + (f" at {inner}" if inner else ""), given=spec,
                          fix="pass a dataset repo (or a path in it) with parquet data, or its parquet conversion: "
                              "@refs%2Fconvert%2Fparquet")
    missing = [f.path for f in files if offline() and f.cached() is None]
    if missing:
        raise ConfigError(f"{len(missing)} of the {len(files)} .parquet files of the hub dataset are not in the HF "
                          f"cache (e.g. {missing[0]}) and HF_HUB_OFFLINE=1", given=spec, fix=download_fix(repo))
    return files


def _online(spec: str, repo: str, revision: str | None) -> list[HubFile]:
    from huggingface_hub import HfApi

    try:
        sha = HfApi(endpoint=endpoint()).dataset_info(repo, revision=revision, timeout=timeout()).sha
        found = file_system().find(f"datasets/{repo}@{sha}", detail=True)
    except Exception as e:
        raise hub_error(e, spec) from None
    root = f"datasets/{repo}@{sha}/"
    files = [HubFile(repo, sha, name.removeprefix(root), int(info["size"]),
                     (info.get("lfs") or {}).get("sha256") or info.get("blob_id") or "")
             for name, info in sorted(found.items()) if name.endswith(".parquet") and info.get("type") == "file"]
    _record(repo, revision, sha, files)
    return files


def _listing(repo: str, name: str) -> Path:
    return cache_dir() / "s2cli" / ("datasets--" + repo.replace("/", "--")) / name


def _record(repo: str, revision: str | None, sha: str, files: list[HubFile]) -> None:
    """The listing of the commit, and the revision asked -> the commit, beside the cache (atomic writes; a
    read-only cache keeps none: offline then lists the cached snapshot)."""
    try:
        for name, text in ((f"{sha}.json", json.dumps([asdict(f) for f in files])), (f"ref-{revision or 'main'}", sha)):
            path = _listing(repo, name.replace("/", "%2F"))
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            tmp.write_text(text)
            os.replace(tmp, path)
    except OSError:
        pass


def _offline(spec: str, repo: str, revision: str | None) -> list[HubFile]:
    """The recorded listing of the revision's commit; else the .parquet files of its cached snapshot (downloaded
    by `hf download`)."""
    rev = revision or "main"
    sha = rev if SHA_RE.match(rev) else None
    for ref in (_listing(repo, f"ref-{rev.replace('/', '%2F')}"),
                cache_dir() / ("datasets--" + repo.replace("/", "--")) / "refs" / rev):
        if sha is None and ref.is_file():
            sha = ref.read_text().strip()
    if sha is None:
        raise ConfigError("the hub dataset is not in the HF cache and HF_HUB_OFFLINE=1", given=spec,
                          fix=download_fix(repo))
    listing = _listing(repo, f"{sha}.json")
    if listing.is_file():
        return [HubFile(**f) for f in json.loads(listing.read_text())]
    snap = cache_dir() / ("datasets--" + repo.replace("/", "--")) / "snapshots" / sha
    return [HubFile(repo, sha, p.relative_to(snap).as_posix(), p.stat().st_size, Path(os.path.realpath(p)).name)
            for p in sorted(snap.rglob("*.parquet"))]


def download_fix(repo: str) -> str:
    return (f"run once where the hub can be reached (unset HF_HUB_OFFLINE), or download it ahead: "
            f"hf download {repo} --repo-type dataset --include '*.parquet'")


def hub_error(e: Exception, spec: str) -> ConfigError:
    """One line for what went wrong asking the hub for a dataset."""
    name = type(e).__name__
    if isinstance(e, ConfigError):
        return e
    if name == "RepositoryNotFoundError":
        return ConfigError("no such dataset on the hub (or it is private)", given=spec,
                           fix="check ORG/NAME; log in (hf auth login) for a private one")
    if name == "RevisionNotFoundError":
        return ConfigError("the hub dataset has no such revision", given=spec, fix="check the @REVISION")
    if name == "GatedRepoError":
        return ConfigError("the hub dataset is gated", given=spec, fix="accept its terms on the hub, then hf auth login")
    first = (str(e).strip().splitlines() or [""])[0][:200]
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status is not None:
        return ConfigError(f"the hub {endpoint()} answered HTTP {status} for the dataset: {first}", given=spec,
                           fix="check the URL and your access (hf auth login), or retry later")
    if isinstance(e, FileNotFoundError):
        return ConfigError(f"the hub dataset has no such file: {first}", given=spec,
                           fix="check the dataset's files on the hub (a rerun lists them again)")
    if not isinstance(e, (OSError, ConnectionError)) and "Connect" not in name and "Timeout" not in name:
        return ConfigError(f"asking the hub {endpoint()} for the dataset failed ({name}: {first})", given=spec,
                           fix="check the URL and HF_ENDPOINT, then rerun")
    return ConfigError(f"the hub {endpoint()} cannot be reached ({name}: {first})", given=spec,
                       fix="check the network and HF_ENDPOINT; offline (HF_HUB_OFFLINE=1), a dataset read once before "
                           "is read from the HF cache")
