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
from .fsutil import SPOOL_PREFIX, atomic_write_text, claim_held, create_exclusive, pid_alive, remove_path, write_error
from .hub import endpoint

URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
# the package each common protocol needs (fsspec's own registry names the others in its message)
PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
            "abfss": "adlfs", "http": "aiohttp", "https": "aiohttp", "hf": "huggingface_hub", "sftp": "paramiko"}
SPOOL_RE = re.compile(rf"^{SPOOL_PREFIX}(.+)-(\d+)-[^-]+$")


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
    # the hub's file system asks the endpoint in effect now (HF_ENDPOINT), as the rest of s2cli does, not the one
    # huggingface_hub read when it was imported
    fs = cls(endpoint=endpoint()) if protocol == "hf" else cls()
    return Reachable(fs, url), cls._strip_protocol(url)


# exceptions (by class name, so no store's package is imported here) that say the store could not be reached:
# botocore's, aiohttp's (s3fs, gcsfs, https), and the socket's own
UNREACHABLE = ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ServerTimeoutError",
               "ConnectionRefusedError", "gaierror")


def unreachable(url: str, e: BaseException, fs: Any = None) -> ConfigError | None:
    """A store that cannot be reached (down, a wrong endpoint, no network) as one line naming the URL and the
    endpoint; None for any other error."""
    if not {c.__name__ for c in type(e).__mro__} & set(UNREACHABLE):
        return None
    return ConfigError(f"cannot reach the storage of {url} at {endpoint_of(url, e, fs)} ({type(e).__name__})",
                       given=url, fix="check the endpoint (AWS_ENDPOINT_URL, the profile's endpoint_url), the network "
                                      "and that the store is up, then rerun the same command")


def endpoint_of(url: str, e: BaseException | None = None, fs: Any = None) -> str:
    """Where a URL's store was contacted: the endpoint in the error, the file system's or the environment's
    (AWS_ENDPOINT_URL), else the URL's own host (https://) or its protocol's default."""
    from urllib.parse import urlsplit

    named = (getattr(e, "kwargs", None) or {}).get("endpoint_url") or getattr(fs, "endpoint_url", None) or (
        (getattr(fs, "client_kwargs", None) or {}).get("endpoint_url"))
    if not named and url.startswith(("s3://", "s3a://")):
        named = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not named and url.startswith(("http://", "https://")):
        named = url
    if not named:
        return f"the default endpoint of {url.split('://', 1)[0]}://"
    parts = urlsplit(str(named))
    return f"{parts.scheme}://{parts.netloc}" if parts.netloc else str(named)


class Reachable:
    """An fsspec file system whose calls turn a store that cannot be reached into one line (`unreachable`, exit 2)
    instead of the store's own traceback; everything else passes through."""

    def __init__(self, fs: Any, url: str):
        self._fs, self._url = fs, url

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_fs", "_url"):
            raise AttributeError(name)
        attr = getattr(self._fs, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return attr(*args, **kwargs)
            except Exception as e:
                err = unreachable(self._url, e, self._fs)
                if err is None:
                    raise
                raise err from None
        return call


def check_url(url: str) -> None:
    """Refuse, before any work, a URL whose file system cannot be used here (see `filesystem`)."""
    if local_of(url) is None:
        filesystem(url)


def reach(url: str) -> None:
    """Contact the store of a remote URL once (nothing for a local path): a store that cannot be reached is one
    line (`unreachable`) now, before weights are located or downloaded, not after."""
    if local_of(url) is None:
        folder(url).exists()


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
                        elif e.is_dir() and not e.name.startswith("."):  # a shard of a format whose output is a folder
                            out[e.name] = _local_tree(Path(e.path))
                    except OSError:  # removed meanwhile
                        continue
        except OSError:
            return {}
        return out

    def identity(self, name: str) -> Any:
        """The id of `stats` for one file (or folder)."""
        p = self.path / name
        return _local_tree(p)[1] if p.is_dir() else _local_id(p.stat())

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
        remove_path(self.path / name)  # a shard of a format whose output is a folder goes whole

    def size(self, name: str) -> int:
        p = self.path / name
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size

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
        self._cache: ShardCache | None = None

    @property
    def url(self) -> str:
        return self._url

    def _p(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _failed(self, name: str, e: BaseException) -> S2Error:
        if isinstance(e, S2Error):  # said already (a store that cannot be reached)
            return e
        return S2Error(f"writing {self._url}/{name} failed: {type(e).__name__}: {e}", fix=(
            "check the store's credentials, the bucket and the network, then rerun the same command: completed "
            "shards are kept and the run continues after them"))

    def _fresh(self) -> None:
        self.fs.invalidate_cache(self.root)

    def _type(self, path: str) -> str | None:
        """"file", "directory" or None (absent); a store that cannot be reached is an error, never "absent"
        (fsspec's exists/isfile would say False)."""
        self.fs.invalidate_cache(path)
        try:
            return self.fs.info(path).get("type")
        except FileNotFoundError:
            return None

    def exists(self) -> bool:
        self._fresh()
        return self._type(self.root) is not None

    def is_dir(self) -> bool:
        self._fresh()
        return self._type(self.root) == "directory"

    def mkdir(self) -> None:
        if self._type(self.root) == "file":
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
        return self._type(self._p(name)) == "file"

    def stats(self) -> dict[str, tuple[int | None, Any]]:
        """Every file's name -> (size, id: its ETag, or what the store has in its place), from one listing; a
        folder's -> (None, None): what it holds is not listed here."""
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: (int(e.get("size") or 0), _remote_id(e)) if e.get("type") == "file"
                else (None, None) for e in self._listing()}

    def identity(self, name: str) -> Any:
        self.fs.invalidate_cache(self._p(name))
        info = self.fs.info(self._p(name))
        return _remote_id(info) if info.get("type") == "file" else None

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
        """A local copy of `name`, from this host's shared cache of the folder (`ShardCache`): downloaded once while
        the store's copy stays the same (its size and ETag or time)."""
        if self._cache is None or self._cache.pid != os.getpid():  # a forked worker joins as itself
            self._cache = ShardCache.join(self._url)
        known = self._cache.checked.get(name)  # asked the store once per process: a rewritten copy is fetched again
        identity = known if known is not None else _identity(self.fs.info(self._p(name)))
        return self._cache.get(name, identity, lambda tmp: self.fs.get_file(self._p(name), str(tmp)))

    def close(self) -> None:
        if self._spool is not None:
            shutil.rmtree(self._spool, ignore_errors=True)
        if self._cache is not None and self._cache.pid == os.getpid():
            self._cache.leave()
        self._spool = self._cache = None


def _local_id(st: os.stat_result) -> list[int]:
    return [st.st_ino, st.st_ctime_ns, st.st_mtime_ns]


def _local_tree(root: Path) -> tuple[int, list[list[Any]]]:
    """(bytes, [[relative name, inode, ctime, mtime] of each file, in name order]) of a local folder."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    stats = [(p.relative_to(root).as_posix(), p.stat()) for p in files]
    return sum(st.st_size for _, st in stats), [[n, st.st_ino, st.st_ctime_ns, st.st_mtime_ns] for n, st in stats]


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


def _identity(info: dict[str, Any]) -> str:
    """What tells one version of a stored file from another, as the store gives it for free."""
    tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or info.get("created")
    return f"{info.get('size')}-{tag}"


CACHE_PREFIX = "s2cli-cache-"  # + host + a digest of the folder's URL: one cache per remote folder and host
DEFAULT_CACHE_BYTES = 8 << 30


def cache_bytes() -> int:
    """The bound of one folder's cache (S2CLI_CACHE_BYTES, default 8 GiB): least recently used files go first."""
    text = os.environ.get("S2CLI_CACHE_BYTES")
    try:
        return int(text) if text else DEFAULT_CACHE_BYTES
    except ValueError:
        raise ConfigError("S2CLI_CACHE_BYTES must be a number of bytes", given=text, fix="e.g. S2CLI_CACHE_BYTES=8589934592") from None


class ShardCache:
    """The local copies of a remote folder's files on this host, in S2CLI_SPOOL (else the temporary folder), shared
    by every process that reads the folder (DataLoader workers, epochs, readers): each process that uses it has a
    file in its `.users/`; the last one to leave (close, exit, a stop signal that unwinds) removes the cache, and a
    cache whose users are all gone (killed) is removed by the next process that opens one. Bounded by
    `cache_bytes()` (least recently used files evicted; one file larger than that is still fetched)."""

    _joined: dict[tuple[int, str], ShardCache] = {}  # (pid, folder) -> this process's membership
    _exit_hook: int | None = None  # the pid whose exit hook is registered

    def __init__(self, root: Path):
        self.root, self.pid, self.refs = root, os.getpid(), 0
        self.checked: dict[str, str] = {}  # name -> identity, checked once per process

    @classmethod
    def join(cls, url: str) -> ShardCache:
        import hashlib

        key = (os.getpid(), url)
        if key not in cls._joined:
            base = spool_root()
            remove_dead(base, CACHE_PREFIX)
            root = base / f"{CACHE_PREFIX}{socket.gethostname()}-{hashlib.sha256(url.encode()).hexdigest()[:16]}"
            (root / ".users").mkdir(parents=True, exist_ok=True)
            (root / ".users" / str(os.getpid())).touch()
            cls._joined[key] = ShardCache(root)
            cls._on_exit()
        c = cls._joined[key]
        c.refs += 1
        return c

    @classmethod
    def _on_exit(cls) -> None:
        """Leave every cache when this process ends: at exit, and in a multiprocessing child (a DataLoader
        worker) at its end, where atexit does not run."""
        if cls._exit_hook == os.getpid():
            return
        from multiprocessing import util

        util.Finalize(None, cls.leave_all, exitpriority=10)
        cls._exit_hook = os.getpid()

    @classmethod
    def leave_all(cls) -> None:
        for (pid, url), c in list(cls._joined.items()):
            if pid == os.getpid():
                c.refs = 1
                c.leave()

    def leave(self) -> None:
        """One reader of this process is done with the cache; the process's last one takes its user file out,
        and the cache goes when no user is left."""
        self.refs -= 1
        if self.refs > 0:
            return
        ShardCache._joined = {k: v for k, v in ShardCache._joined.items() if v is not self}
        (self.root / ".users" / str(self.pid)).unlink(missing_ok=True)
        if not live_users(self.root):
            shutil.rmtree(self.root, ignore_errors=True)

    def get(self, name: str, identity: str, download: Any) -> Path:
        """The local copy of `name` at `identity` (downloaded by `download(tmp_path)` when missing or another
        version), marked as just used."""
        local = self.root / name
        stamp = self.root / f".{name}.id"
        if local.is_file() and (self.checked.get(name) == identity or
                                (stamp.is_file() and stamp.read_text() == identity)):
            os.utime(local)
        else:
            self._evict(self.bound)
            tmp = self.root / f".{name}.tmp-{os.getpid()}"
            download(tmp)
            stamp_tmp = self.root / f".{name}.id.tmp-{os.getpid()}"
            stamp_tmp.write_text(identity)
            os.replace(tmp, local)
            os.replace(stamp_tmp, stamp)
            self._evict(self.bound, keep=name)
        self.checked[name] = identity
        return local

    @property
    def bound(self) -> int:
        return cache_bytes()

    def _evict(self, bound: int, keep: str | None = None) -> None:
        """Least recently used copies go until the cache holds at most `bound` bytes (`keep` stays)."""
        files = []
        for p in self.root.iterdir():
            if p.is_file() and not p.name.startswith("."):
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                files.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files, key=lambda f: f[0]):
            if total <= bound:
                break
            if p.name != keep:
                p.unlink(missing_ok=True)
                (self.root / f".{p.name}.id").unlink(missing_ok=True)
                total -= size


def live_users(root: Path) -> list[int]:
    """The processes of this host that use the cache at `root` and are alive."""
    users = root / ".users"
    pids = [int(p.name) for p in users.iterdir() if p.name.isdigit()] if users.is_dir() else []
    return [pid for pid in pids if pid_alive(pid)]


def remove_dead(base: Path, prefix: str) -> None:
    """Caches of this host under `base` whose users are all gone (killed with kill -9): removed."""
    import time

    for p in base.glob(f"{prefix}{socket.gethostname()}-*"):
        try:
            young = p.stat().st_mtime > time.time() - 60  # maybe being joined right now: its user file comes next
        except FileNotFoundError:
            continue
        if p.is_dir() and not young and not live_users(p):
            shutil.rmtree(p, ignore_errors=True)


def spool_root() -> Path:
    """Where spools go: S2CLI_SPOOL, else the system's temporary folder."""
    return Path(os.environ.get("S2CLI_SPOOL") or tempfile.gettempdir())


def new_spool() -> Path:
    """A fresh spool folder for this process; spools of processes of this machine that are gone (killed) are
    removed first."""
    root = spool_root()
    root.mkdir(parents=True, exist_ok=True)
    for p in root.glob(f"{SPOOL_PREFIX}*"):
        m = SPOOL_RE.match(p.name)
        if m and m.group(1) == socket.gethostname() and not pid_alive(int(m.group(2))):
            shutil.rmtree(p, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{SPOOL_PREFIX}{socket.gethostname()}-{os.getpid()}-", dir=root))


def folder(path: str | os.PathLike | Folder) -> Folder:
    """The folder a path or URL names (a `file://` URL is its local path)."""
    if isinstance(path, Folder):
        return path
    local = local_of(path)
    return Folder(local) if local is not None else RemoteFolder(str(path))
