"""Hub: model repos on the Hugging Face Hub, kept in its standard cache (HF_HOME, HF_HUB_CACHE). A repo is
downloaded on first use by one process per node (a file lock in the cache; the others wait for it and read
what it fetched), never when offline (HF_HUB_OFFLINE=1, or --offline); `s2 fetch` asks the hub again. The cache
is read with huggingface_hub's `try_to_load_from_cache` (no network), so a miss offline is one line at once; a
download has a short timeout and no retries before the first answer."""
from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import ConfigError, S2Error, WeightsNotFoundError

CONFIG_FILES = ("config.json", "preprocessor_config.json", "open_clip_config.json")
# the weights of a repo, in the order they are preferred: one file, or an index and the shards it names
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
                "open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# a .bin's safetensors twin where its name is not the .bin's with another suffix
TWINS = {"open_clip_pytorch_model.bin": "open_clip_model.safetensors"}
SHA_RE = re.compile(r"^[0-9a-f]{40}$")
NAME_RE = re.compile(r"^[A-Za-z0-9_](?:[\w.-]{0,94}[A-Za-z0-9_])?$")  # an org or a name: no leading/trailing . or -
_TRUE = ("1", "ON", "YES", "TRUE")


def timeout() -> float:
    """Seconds to wait for the hub's first answer (S2CLI_HUB_TIMEOUT, default 10)."""
    return float(os.environ.get("S2CLI_HUB_TIMEOUT", "10"))


def offline() -> bool:
    """HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1): read the cache, never the network (`--offline` sets it)."""
    return any(os.environ.get(k, "").upper() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hf_home() -> Path:
    """$HF_HOME, else $XDG_CACHE_HOME/huggingface, else ~/.cache/huggingface (huggingface_hub's own rule)."""
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(os.path.expandvars(os.path.expanduser(home)))


def cache_dir() -> Path:
    """The hub cache: $HF_HUB_CACHE, else $HF_HOME/hub."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    return Path(os.path.expandvars(os.path.expanduser(env))) if env else hf_home() / "hub"


def cache_env() -> dict[str, str]:
    """The environment that names this cache to another process: HF_HOME, and HF_HUB_CACHE when it is set apart."""
    env = {"HF_HOME": str(hf_home().absolute())}
    if os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        env["HF_HUB_CACHE"] = str(cache_dir().absolute())
    return env


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


@dataclass(frozen=True)
class Ref:
    """A repo and the revision asked for (a branch, a tag or a commit sha; None: main)."""

    repo: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo + (f"@{self.revision}" if self.revision else "")


@dataclass(frozen=True)
class Snapshot:
    """A repo at one commit, in the cache: `path` holds its files; `weights` names its weight files there."""

    repo: str
    sha: str
    path: Path
    weights: tuple[str, ...] = ()

    @property
    def ident(self) -> str:
        """What an output records: org/name@<commit sha>."""
        return f"{self.repo}@{self.sha}"


def is_repo_id(text: str) -> bool:
    """`name` or `org/name` as the hub spells them (huggingface_hub's rule, checked without importing it)."""
    parts = text.split("/")
    return len(parts) <= 2 and all(NAME_RE.match(p) for p in parts) and "--" not in text and ".." not in text


def parse_ref(text: str, spec: str) -> Ref:
    """`org/name` or `org/name@revision`; anything else is one line (exit 2), not huggingface_hub's traceback."""
    repo, _, rev = text.partition("@")
    if not is_repo_id(repo) or (_ and not rev):
        looks_like_path = text.startswith((".", "/", "~")) or os.sep in text.strip("/").replace("/", "", 1)
        raise ConfigError(f"{spec}: no such folder" if looks_like_path else f"{spec}: not a hub model id",
                          given=text, expected="hf:org/name[@revision] or hf:/path/to/a/save_pretrained/folder",
                          fix="check the path (a folder written by save_pretrained) or the id on the hub")
    return Ref(repo, rev or None)


# ---- the cache, read with huggingface_hub's try_to_load_from_cache -------------------------------------------------
def repo_folder(repo: str) -> Path:
    return cache_dir() / ("models--" + repo.replace("/", "--"))


def _snapshot_of(ref: Ref, anchors: list[str]) -> Path | None:
    """The cached snapshot folder of `ref` that holds the first of `anchors` found there (huggingface_hub resolves
    the branch or tag through the cache's refs/), or None."""
    from huggingface_hub import try_to_load_from_cache

    for name in anchors:
        hit = try_to_load_from_cache(ref.repo, name, cache_dir=str(cache_dir()), revision=ref.revision)
        if isinstance(hit, str):
            return Path(hit).parent
    return None


def _preferred(filename: str | None) -> list[str]:
    """The weight files to look for, best first: `filename` (after its safetensors twin), else WEIGHT_FILES."""
    if filename:
        return [*([TWINS.get(filename) or filename[:-4] + ".safetensors"] if filename.endswith(".bin") else []), filename]
    return list(WEIGHT_FILES)


def _weights_in(names: set[str], read_index, filename: str | None) -> tuple[str, ...]:
    """The weight files to use among `names` (the first kind present of WEIGHT_FILES, or `filename` and its
    safetensors twin); an index comes with every shard it names (`read_index(name)` -> its weight_map)."""
    for name in _preferred(filename):
        if name not in names:
            continue
        if not name.endswith(".index.json"):
            return (name,)
        shards = read_index(name)
        if shards is None:  # listed by the hub, not read yet: its shards are the files beside it
            prefix = name.split(".", 1)[0] + "-"
            return (name, *sorted(n for n in names if n.startswith(prefix)))
        if set(shards) <= names:
            return (name, *sorted(shards))
    return ()


def _local_index(folder: Path):
    def read(name: str) -> list[str] | None:
        try:
            return list(set(json.loads((folder / name).read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError):
            return ["<unreadable index>"]
    return read


def cached_weights(folder: Path, filename: str | None = None) -> tuple[str, ...]:
    """The weight files of a local folder (a snapshot, or one written by save_pretrained), as a download picks them."""
    try:
        names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    except OSError:
        return ()
    return _weights_in(names, _local_index(folder), filename)


def cached(ref: Ref, *, weights: bool = True, filename: str | None = None,
           config: str | None = "config.json") -> Snapshot | None:
    """The snapshot of `ref` in the cache if it holds what is asked (the `config` file; the weights), else None."""
    anchors = [config] if config else _preferred(filename)
    folder = _snapshot_of(ref, anchors)
    if folder is None:
        return None
    files = cached_weights(folder, filename) if weights else ()
    if weights and not files:
        return None
    return Snapshot(ref.repo, folder.name, folder, files)


def offline_miss(ref: Ref, what: str) -> WeightsNotFoundError:
    return WeightsNotFoundError(
        f"weights for {what} are not on this machine (looked for {ref} in the HF cache {cache_dir()}; offline: "
        f"HF_HUB_OFFLINE=1 or --offline)",
        fix=f"run `s2 fetch {what}` where there is network and point HF_HOME at that cache, or pass "
            f"--model hf:/path/to/saved/dir, --weights PATH, or --random-init for a dry run")


# ---- downloads --------------------------------------------------------------------------------------------------
def ensure(ref: Ref, *, what: str, weights: bool = True, filename: str | None = None,
           config: str | None = "config.json") -> Snapshot:
    """On first use: the cached snapshot, else downloaded now (by one process of this node at a time: a process
    that finds another downloading waits for it, then reads the cache), else one line saying why not."""
    hit = cached(ref, weights=weights, filename=filename, config=config)
    if hit is not None:
        return hit
    if offline():
        raise offline_miss(ref, what)
    with node_lock(ref.repo):
        hit = cached(ref, weights=weights, filename=filename, config=config)
        if hit is not None:
            return hit
        return download(ref, what=what, weights=weights, filename=filename, config=config)


def download(ref: Ref, *, what: str, weights: bool = True, filename: str | None = None,
             config: str | None = "config.json") -> Snapshot:
    """Ask the hub for `ref` now and download what a run needs of it (configs and the weights; no optimizer
    states, no other frameworks' files) into the cache; the revision asked for then names that commit there."""
    try:
        from huggingface_hub import HfApi, snapshot_download
    except ImportError:  # pragma: no cover - transformers depends on it
        raise WeightsNotFoundError("huggingface_hub is not installed", fix="pip install huggingface_hub") from None
    api = HfApi(endpoint=endpoint())
    try:
        info = api.model_info(ref.repo, revision=ref.revision or "main", timeout=timeout())
    except Exception as e:
        raise _hub_error(e, ref, what) from None
    siblings = {s.rfilename for s in (info.siblings or [])}
    if config and config not in siblings:
        raise WeightsNotFoundError(f"{ref} on the hub has no {config}, so s2cli cannot tell what model it is",
                                   given=what, fix="pass a transformers checkpoint repo, or a timm:<name> model")
    files = _weights_in(siblings, lambda name: None, filename) if weights else ()
    if weights and not files:
        raise WeightsNotFoundError(f"{ref} on the hub has no weights s2cli can load (looked for {', '.join(WEIGHT_FILES)})",
                                   given=what, fix="pass a repo with safetensors or PyTorch weights, or --weights PATH")
    wanted = list(dict.fromkeys([f for f in (config, *CONFIG_FILES) if f in siblings] + list(files)))
    try:
        snapshot_download(ref.repo, revision=info.sha, allow_patterns=wanted, cache_dir=str(cache_dir()),
                          endpoint=endpoint(), etag_timeout=timeout())
    except Exception as e:
        raise _hub_error(e, ref, what) from None
    if ref.revision != info.sha:
        _write_ref(ref.repo, ref.revision or "main", info.sha)
    snap = cached(Ref(ref.repo, info.sha), weights=weights, filename=filename, config=config)
    if snap is None:
        raise S2Error(f"downloaded {ref} but its files are not complete in the cache {cache_dir()}", given=what,
                      fix=f"run `s2 fetch {what}` again")
    return snap


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "spiece.model", "added_tokens.json")


def ensure_tokenizer(folder: Path, what: str) -> Path:
    """A snapshot folder (or a save_pretrained one) with its tokenizer's files: those of the repo at the snapshot's
    commit are downloaded on first use (a text query's first embed_text), none when offline or already there."""
    if any((folder / f).is_file() for f in TOKENIZER_FILES):
        return folder
    repo_dir = folder.parent.parent
    if offline() or folder.parent.name != "snapshots" or not repo_dir.name.startswith("models--"):
        raise WeightsNotFoundError(f"no tokenizer files in {folder} ({', '.join(TOKENIZER_FILES[:2])}, ...)",
                                   given=what, fix="save the tokenizer beside the model (tokenizer.save_pretrained), "
                                                   "or run once where the hub can be reached")
    repo = repo_dir.name[len("models--"):].replace("--", "/")
    from huggingface_hub import snapshot_download

    try:
        with node_lock(repo):
            snapshot_download(repo, revision=folder.name, allow_patterns=list(TOKENIZER_FILES), cache_dir=str(cache_dir()),
                              endpoint=endpoint(), etag_timeout=timeout())
    except Exception as e:
        raise _hub_error(e, Ref(repo, folder.name), what) from None
    return folder


def _write_ref(repo: str, revision: str, sha: str) -> None:
    path = repo_folder(repo) / "refs" / revision
    try:
        if path.is_file() and path.read_text().strip() == sha:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(sha)
        os.replace(tmp, path)
    except OSError:  # a read-only cache: the snapshot is there all the same, found by its sha
        pass


@contextlib.contextmanager
def node_lock(repo: str) -> Iterator[None]:
    """One downloader of `repo` at a time on this node: a file lock in the cache (the others wait for it)."""
    path = cache_dir() / ".locks" / "s2cli" / ("models--" + repo.replace("/", "--") + ".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        from filelock import FileLock, Timeout

        lock = FileLock(str(path))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            print(f"waiting for another process that is downloading {repo} (lock {path})", file=sys.stderr, flush=True)
            lock.acquire()
    except (OSError, ImportError):  # a read-only cache: nothing to download into anyway; no lock
        yield
        return
    try:
        yield
    finally:
        lock.release()


def _hub_error(e: Exception, ref: Ref, what: str) -> S2Error:
    """One line for what went wrong asking the hub for `ref`."""
    name = type(e).__name__
    first = (str(e).strip().splitlines() or [""])[0][:200]
    where = endpoint()
    if name == "GatedRepoError":
        return WeightsNotFoundError(f"{ref.repo} is gated on the hub {where}", given=what,
                                    fix=f"accept its terms at {where}/{ref.repo}, then log in with `hf auth login`")
    if name == "RepositoryNotFoundError":
        return WeightsNotFoundError(f"no model {ref.repo} on the hub {where} (or it is private)", given=what,
                                    fix="check the id (org/name), or log in with `hf auth login` for a private repo")
    if name == "RevisionNotFoundError":
        return WeightsNotFoundError(f"{ref.repo} has no revision {ref.revision} on the hub {where}", given=what,
                                    fix="pass a branch, tag or commit sha of the repo after @")
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status in (401, 403):
        return WeightsNotFoundError(f"the hub {where} refused {ref} (HTTP {status}): it needs a login", given=what,
                                    fix="log in with `hf auth login` (or set HF_TOKEN) with access to the repo")
    if status is not None and name not in ("LocalEntryNotFoundError",):
        return WeightsNotFoundError(f"the hub {where} answered HTTP {status} for {ref}: {first}", given=what,
                                    fix="retry later, or `s2 fetch` where the hub answers and point HF_HOME at that cache")
    return WeightsNotFoundError(
        f"weights for {what} are not on this machine (looked for {ref} in the HF cache {cache_dir()}) and the hub "
        f"{where} cannot be reached ({name}: {first})",
        fix=f"connect this machine, or run `s2 fetch {what}` where there is network and point HF_HOME at that "
            f"cache (then HF_HUB_OFFLINE=1); HF_ENDPOINT names the hub")
