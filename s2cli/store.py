"""Where files live: a local folder (plain os calls, atomic renames, flock claims) or a folder on remote storage
behind an fsspec URL (s3://, gs://, memory://, ...), with one small interface for the output-folder protocol,
and the one check that a URL's file system is installed (one line naming the package, never a local folder
named after the URL)."""
from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from .errors import ConfigError, S2Error
from .fsutil import atomic_write_text, claim_held, create_exclusive, pid_alive, write_error

URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
# the package each common protocol needs (fsspec's own registry names the others in its message)
PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
            "abfss": "adlfs", "http": "aiohttp", "https": "aiohttp", "hf": "huggingface_hub", "sftp": "paramiko"}
SPOOL_RE = re.compile(r"^s2cli-spool-(.+)-(\d+)-[^-]+$")


def is_url(spec: str | os.PathLike) -> bool:
    """`spec` names a file or folder by URL (`scheme://...`); `file://` URLs count (they resolve to local paths)."""
    return isinstance(spec, str) and bool(URL_RE.match(spec))


def local_of(spec: str | os.PathLike) -> str | os.PathLike | None:
    """The local path `spec` names: itself when it is not a URL, the path of a `file://` URL, else None."""
    if not is_url(spec):
        return spec
    if str(spec).startswith("file://"):
        return str(spec)[len("file://"):] or "/"
    return None


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec file system, path inside it) for a URL. A protocol whose package is missing, or an unknown one, is
    a ConfigError in one line naming what to install; nothing is contacted here (credentials are read on use)."""
    import fsspec
    from fsspec.core import split_protocol

    protocol, _ = split_protocol(url)
    try:
        cls = fsspec.get_filesystem_class(protocol)
    except ImportError:
        pkg = PACKAGES.get(protocol) or protocol
        raise ConfigError(f"{protocol}:// URLs need the {pkg} package, which is not installed", given=url,
                          fix=f"pip install {pkg}" + (" (or pip install 's2-features[s3]')" if pkg == "s3fs" else
                                                       " (or pip install 's2-features[gcs]')" if pkg == "gcsfs" else "")) from None
    except ValueError:
        raise ConfigError(f"{protocol}:// is not a storage protocol fsspec knows", given=url,
                          expected="a local path, or an fsspec URL (s3://, gs://, az://, https://, memory://, ...)",
                          fix="check the URL's scheme, or install the fsspec package that provides it") from None
    return cls(), cls._strip_protocol(url)


def check_url(url: str) -> None:
    """Refuse, before any work, a URL whose file system cannot be used here (see `filesystem`)."""
    if local_of(url) is None:
        filesystem(url)


def open_url(url: str, mode: str = "rb") -> Any:
    """A file object for a URL (an fsspec one) or a local path."""
    local = local_of(url)
    if local is not None:
        return open(local, mode)
    fs, path = filesystem(url)
    return fs.open(path, mode)


def join_url(base: str, rel: str) -> str:
    """`rel` (a relative path with /) under the URL `base`."""
    return base.rstrip("/") + "/" + rel.lstrip("/")


class Folder:
    """A local folder: plain os calls, temp + fsync + rename writes, flock claims."""

    remote = False

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @property
    def url(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return self.url

    def exists(self) -> bool:
        return self.path.exists()

    def is_dir(self) -> bool:
        return self.path.is_dir()

    def mkdir(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def names(self) -> list[str]:
        """Every entry's name (files and folders)."""
        try:
            return os.listdir(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return []

    def files(self) -> set[str]:
        return {p.name for p in self.path.iterdir() if p.is_file()} if self.path.is_dir() else set()

    def is_file(self, name: str) -> bool:
        return (self.path / name).is_file()

    def stats(self) -> dict[str, tuple[int, Any]]:
        """Every file's name -> what the store tells of it for free: (size, id), the id being what changes whenever
        the file is written or replaced (here [inode, ctime, mtime] in ns: a `cp -p` over a file keeps its inode and
        mtime, never its ctime)."""
        out = {}
        try:
            with os.scandir(self.path) as it:
                for e in it:
                    try:
                        if e.is_file():
                            st = e.stat()
                            out[e.name] = (st.st_size, [st.st_ino, st.st_ctime_ns, st.st_mtime_ns])
                    except OSError:  # removed meanwhile
                        continue
        except OSError:
            return {}
        return out

    def identity(self, name: str) -> Any:
        """The `id` of `stats` for one file."""
        return _local_id((self.path / name).stat())

    def read_text(self, name: str) -> str:
        return (self.path / name).read_text()

    def read_texts(self, names: list[str]) -> dict[str, str]:
        """The texts of these files; one that vanished meanwhile is left out."""
        out = {}
        for n in names:
            try:
                out[n] = self.read_text(n)
            except OSError:
                continue
        return out

    def write_text(self, name: str, text: str) -> None:
        atomic_write_text(self.path / name, text)

    def create_exclusive(self, name: str, text: str) -> bool:
        return create_exclusive(self.path / name, text)

    def append_text(self, name: str, text: str) -> None:
        try:
            with open(self.path / name, "a") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as e:
            raise write_error(self.path / name, e) from e

    def unlink(self, name: str) -> None:
        (self.path / name).unlink(missing_ok=True)

    def size(self, name: str) -> int:
        return (self.path / name).stat().st_size

    def claim_holder(self, name: str) -> str | None:
        """Who holds the lock file `name` now (local folders only; a remote one has no lock files)."""
        return claim_held(self.path / name)

    def spool(self, name: str) -> Path:
        """Where a shard is written before it is committed: in place (the writer renames it atomically)."""
        return self.path / name

    def publish(self, local: Path, name: str) -> None:
        """Make the written file `local` the folder's `name`: here it already is."""

    def fetch(self, name: str) -> Path:
        """A local file with the content of `name`: here the file itself."""
        return self.path / name

    def close(self) -> None:
        """Remove this process's local spool and cache (nothing for a local folder)."""


class RemoteFolder(Folder):
    """A folder on remote storage through fsspec. Objects are written whole (an object store shows an object
    complete or not at all); shards are written to a local spool first and uploaded; listings are never taken
    from fsspec's cache (another process may have changed the folder). What an object store cannot give: an
    atomic create-if-absent and locks, so claims there are heartbeat objects (see heartbeat.claim_remote)."""

    remote = True

    def __init__(self, url: str):
        self._url = url.rstrip("/")
        self.fs, self.root = filesystem(self._url)
        self.root = self.root.rstrip("/")
        self.path = self._url  # type: ignore[assignment]  # shown in messages: the URL as given
        self._spool: Path | None = None
        self._cache: Path | None = None

    @property
    def url(self) -> str:
        return self._url

    def _p(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _failed(self, name: str, e: BaseException) -> S2Error:
        return S2Error(f"writing {self._url}/{name} failed: {type(e).__name__}: {e}", fix=(
            "check the store's credentials, the bucket and the network, then rerun the same command: completed "
            "shards are kept and the run continues after them"))

    def _fresh(self) -> None:
        self.fs.invalidate_cache(self.root)

    def exists(self) -> bool:
        self._fresh()
        return bool(self.fs.exists(self.root))

    def is_dir(self) -> bool:
        self._fresh()
        return bool(self.fs.isdir(self.root))

    def mkdir(self) -> None:
        if self.fs.isfile(self.root):
            return  # prepare() refuses it, naming the URL
        self.fs.makedirs(self.root, exist_ok=True)

    def _listing(self) -> list[dict[str, Any]]:
        self._fresh()
        try:
            return self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return []

    def names(self) -> list[str]:
        return [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in self._listing()]

    def files(self) -> set[str]:
        return {e["name"].rsplit("/", 1)[-1] for e in self._listing() if e.get("type") == "file"}

    def is_file(self, name: str) -> bool:
        self.fs.invalidate_cache(self._p(name))
        return bool(self.fs.isfile(self._p(name)))

    def stats(self) -> dict[str, tuple[int, Any]]:
        """Every file's name -> (size, id: its ETag, or what the store has in its place), from one listing."""
        return {e["name"].rsplit("/", 1)[-1]: (int(e.get("size") or 0), _remote_id(e))
                for e in self._listing() if e.get("type") == "file"}

    def identity(self, name: str) -> Any:
        self.fs.invalidate_cache(self._p(name))
        return _remote_id(self.fs.info(self._p(name)))

    def read_text(self, name: str) -> str:
        return self.fs.cat_file(self._p(name)).decode()

    def read_texts(self, names: list[str]) -> dict[str, str]:
        if not names:
            return {}
        got = self.fs.cat([self._p(n) for n in names], on_error="omit")
        return {p.rsplit("/", 1)[-1]: b.decode() for p, b in got.items() if isinstance(b, bytes)}

    def write_text(self, name: str, text: str) -> None:
        try:
            self.fs.pipe_file(self._p(name), text.encode())
        except Exception as e:  # the store's own errors too (botocore's, aiohttp's)
            raise self._failed(name, e) from e

    def create_exclusive(self, name: str, text: str) -> bool:
        """Not atomic on an object store (no create-if-absent): a file written by another process between the
        check and the write is replaced; the callers compare the content afterwards."""
        if self.is_file(name):
            return False
        self.write_text(name, text)
        return True

    def append_text(self, name: str, text: str) -> None:
        old = self.read_text(name) if self.is_file(name) else ""
        self.write_text(name, old + text)

    def unlink(self, name: str) -> None:
        try:
            self.fs.rm_file(self._p(name))
        except FileNotFoundError:
            pass

    def size(self, name: str) -> int:
        return int(self.fs.size(self._p(name)))

    def claim_holder(self, name: str) -> str | None:
        return None

    def spool(self, name: str) -> Path:
        if self._spool is None:
            self._spool = new_spool()
        return self._spool / name

    def publish(self, local: Path, name: str) -> None:
        """Upload the complete local file, then remove it; the object appears whole under `name`."""
        try:
            self.fs.put_file(str(local), self._p(name))
        except Exception as e:  # the store's own errors too (botocore's, aiohttp's)
            raise self._failed(name, e) from e
        local.unlink(missing_ok=True)

    def fetch(self, name: str) -> Path:
        if self._cache is None:
            self._cache = Path(tempfile.mkdtemp(prefix="s2cli-cache-"))
        local = self._cache / name
        if not local.is_file():
            tmp = local.with_name(f".{name}.tmp")
            self.fs.get_file(self._p(name), str(tmp))
            os.replace(tmp, local)
        return local

    def close(self) -> None:
        for d in (self._spool, self._cache):
            if d is not None:
                shutil.rmtree(d, ignore_errors=True)
        self._spool = self._cache = None


def _local_id(st: os.stat_result) -> list[int]:
    return [st.st_ino, st.st_ctime_ns, st.st_mtime_ns]


def _remote_id(entry: dict[str, Any]) -> str | None:
    """What changes when an object is written again: its ETag (S3, GCS), version, or else its time."""
    for k in ("ETag", "etag", "VersionId", "generation", "md5Hash"):
        if entry.get(k):
            return str(entry[k])
    for k in ("LastModified", "last_modified", "mtime", "updated", "created"):
        v = entry.get(k)
        if v is not None:
            return repr(round(v.timestamp() if hasattr(v, "timestamp") else float(v), 6))
    return None


def spool_root() -> Path:
    """Where spools go: S2CLI_SPOOL, else the system's temporary folder."""
    return Path(os.environ.get("S2CLI_SPOOL") or tempfile.gettempdir())


def new_spool() -> Path:
    """A fresh spool folder for this process; spools of processes of this machine that are gone (killed) are
    removed first."""
    root = spool_root()
    root.mkdir(parents=True, exist_ok=True)
    for p in root.glob("s2cli-spool-*"):
        m = SPOOL_RE.match(p.name)
        if m and m.group(1) == socket.gethostname() and not pid_alive(int(m.group(2))):
            shutil.rmtree(p, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"s2cli-spool-{socket.gethostname()}-{os.getpid()}-", dir=root))


def folder(path: str | os.PathLike | Folder) -> Folder:
    """The folder a path or URL names (a `file://` URL is its local path)."""
    if isinstance(path, Folder):
        return path
    local = local_of(path)
    return Folder(local) if local is not None else RemoteFolder(str(path))
