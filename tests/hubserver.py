"""A loopback Hugging Face Hub for tests: serves folders (written with save_pretrained) as model repos on
127.0.0.1, at the routes huggingface_hub uses to download (HF_ENDPOINT points at it), and counts the downloads.

Routes: `GET /api/models/{repo}[/revision/{rev}]` (JSON: sha, siblings), `GET /api/models/{repo}/tree/{rev}[/{path}]`
(JSON list of a folder's files and folders, all below it with `?recursive=true`: type, path, size, oid, and each
file's `lfs` {oid: sha256, size} as the hub lists stored-in-LFS files), `POST /api/models/{repo}/paths-info/{rev}`
(form `paths`: the same entries for those paths), `HEAD`/`GET /{repo}/resolve/{rev}/{file}` (headers X-Repo-Commit,
ETag: the file's sha256, as the hub gives for LFS files; Content-Length; `Range: bytes=A-[B]` honoured; a 404 says
X-Error-Code RepoNotFound, RevisionNotFound or EntryNotFound); the same for dataset repos under `/api/datasets/...`
and `/datasets/{repo}/resolve/...` (publish with `add(..., repo_type="dataset")`). huggingface_hub's `HfFileSystem`
(ls, find, glob, info, open with range reads) works against it."""
from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

API_RE = re.compile(r"^/api/(?P<type>models|datasets)/(?P<repo>[^/]+/[^/]+)"
                    r"(?:/(?P<kind>revision|tree|paths-info)/(?P<rev>[^/]+)(?:/(?P<path>.+?))?)?/?$")
RESOLVE_RE = re.compile(r"^/(?P<type>datasets/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


class Repo:
    """One repo: revision name or commit sha -> (sha, {file: bytes})."""

    def __init__(self) -> None:
        self.commits: dict[str, dict[str, bytes]] = {}
        self.refs: dict[str, str] = {}

    def resolve(self, rev: str) -> str | None:
        return self.refs.get(rev) or (rev if rev in self.commits else None)


class HubServer:
    """Start with `start()` (or as a context manager), add repos with `add(repo_id, folder)`, point
    HF_ENDPOINT at `url`. `downloads[(repo_id, file)]` counts the GETs of each file's content (whole, or resumed
    to its end); `ranges[(repo_id, file)]` the reads of a byte range of it (`Range: bytes=A-B`); `requests` every
    request as (method, path). `delay` seconds are spent before each content GET (to overlap two clients)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.repos: dict[str, Repo] = {}
        self.downloads: Counter = Counter()
        self.ranges: Counter = Counter()
        self.requests: list[tuple[str, str]] = []
        self.delay = delay
        self._httpd: ThreadingHTTPServer | None = None
        self._lock = threading.Lock()

    # ---- repos --------------------------------------------------------------------------------------------
    def add(self, repo_id: str, folder: str | Path, revision: str = "main", repo_type: str = "model") -> str:
        """Publish every file under `folder` as a commit of `repo_id` (a model repo, or a dataset repo), named
        `revision`; returns its sha."""
        root = Path(folder)
        files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
        h = hashlib.sha1(repo_id.encode())
        for name, data in files.items():
            h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
        sha = h.hexdigest()
        repo = self.repos.setdefault(repo_id if repo_type == "model" else f"datasets/{repo_id}", Repo())
        repo.commits[sha] = files
        repo.refs[revision] = sha
        return sha

    # ---- server -------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._httpd is not None, "start() the server first"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> "HubServer":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                hub._serve(self, head=True)

            def do_GET(self) -> None:
                hub._serve(self, head=False)

            def do_POST(self) -> None:
                hub._serve(self, head=False)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- routes -------------------------------------------------------------------------------------------
    def _serve(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        url = urlsplit(h.path)
        path = unquote(url.path)
        with self._lock:
            self.requests.append((h.command, path))
        query = parse_qs(url.query)
        if h.command == "POST":
            length = int(h.headers.get("Content-Length") or 0)
            query = parse_qs(h.rfile.read(length).decode())
        m = API_RE.match(path)
        if m and not head:
            repo = m["repo"] if m["type"] == "models" else f"datasets/{m['repo']}"
            return self._api(h, repo, m["kind"] or "revision", m["rev"] or "main", m["path"] or "", query)
        m = RESOLVE_RE.match(path)
        if m:
            return self._resolve(h, (m["type"] or "") + m["repo"], m["rev"], m["file"], head)
        return _send(h, 404, b"not found", {"X-Error-Code": "EntryNotFound"})

    def _api(self, h, repo_id: str, kind: str, rev: str, path: str = "", query: dict | None = None) -> None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return _send(h, 404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
        sha = repo.resolve(rev)
        if sha is None:
            return _send(h, 404, b'{"error": "Invalid rev id"}', {"X-Error-Code": "RevisionNotFound"})
        files = repo.commits[sha]
        query = query or {}
        if kind == "tree":
            entries = _tree(files, path.strip("/"), (query.get("recursive") or ["false"])[0].lower() == "true")
            if entries is None:
                return _send(h, 404, b'{"error": "Entry not found"}', {"X-Error-Code": "EntryNotFound"})
            body = entries
        elif kind == "paths-info":
            body = [e for p in query.get("paths", []) for e in (_tree(files, p.strip("/"), False, itself=True) or [])]
        else:
            name = repo_id.removeprefix("datasets/")
            body = {"_id": sha[:24], "id": name, "modelId": name, "sha": sha, "private": False, "gated": False,
                    "disabled": False, "downloads": 0, "likes": 0, "tags": [],
                    "siblings": [{"rfilename": name} for name in files]}
        return _send(h, 200, json.dumps(body).encode(), {"Content-Type": "application/json"})

    def _resolve(self, h, repo_id: str, rev: str, name: str, head: bool) -> None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return _send(h, 404, b"Repository not found", {"X-Error-Code": "RepoNotFound"}, head)
        sha = repo.resolve(rev)
        if sha is None:
            return _send(h, 404, b"Invalid rev id", {"X-Error-Code": "RevisionNotFound"}, head)
        data = repo.commits[sha].get(name)
        if data is None:
            return _send(h, 404, b"Entry not found", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha}, head)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                   "Content-Type": "application/octet-stream"}
        if head:
            return _send(h, 200, data, headers, head=True)
        if self.delay:
            time.sleep(self.delay)
        start, end = 0, len(data)
        rng = re.match(r"bytes=(\d+)-(\d*)$", h.headers.get("Range", ""))
        if rng:
            start = int(rng.group(1))
            end = min(end, int(rng.group(2)) + 1) if rng.group(2) else end
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        with self._lock:
            (self.ranges if rng and rng.group(2) else self.downloads)[(repo_id, name)] += 1
        return _send(h, 206 if rng else 200, data[start:end], headers)


def _send(h: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str], head: bool = False) -> None:
    h.send_response(status)
    for k, v in headers.items():
        h.send_header(k, v)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    if not head:
        try:
            h.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass


def _entry(name: str, data: bytes) -> dict:
    sha256 = hashlib.sha256(data).hexdigest()
    return {"type": "file", "path": name, "size": len(data), "oid": _git_oid(data),
            "lfs": {"oid": sha256, "size": len(data), "pointerSize": 134}}


def _tree(files: dict[str, bytes], path: str, recursive: bool, itself: bool = False) -> list[dict] | None:
    """The entries under `path` (a folder of the repo; "" its root): its files and folders, or every file and
    folder below it (`recursive`); `itself`: the entry of `path` alone (paths-info). None: no such folder."""
    if itself:
        if path in files:
            return [_entry(path, files[path])]
        is_dir = any(n.startswith(path + "/") for n in files)
        return [{"type": "directory", "path": path, "oid": _git_oid(path.encode())}] if is_dir else []
    prefix = path + "/" if path else ""
    below = [n for n in files if n.startswith(prefix)]
    if path and not below:
        return None
    out: dict[str, dict] = {}
    for name in below:
        parts = name[len(prefix):].split("/")
        for depth in range(1, len(parts)):  # the folders on the way
            folder = prefix + "/".join(parts[:depth])
            if recursive or depth == 1:
                out.setdefault(folder, {"type": "directory", "path": folder, "oid": _git_oid(folder.encode())})
        if recursive or len(parts) == 1:
            out[name] = _entry(name, files[name])
    return list(out.values())


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
