"""The heartbeat files of the ranks sharing an output folder: each rank keeps `rank-RRRRR.json` (host, pid,
state, the unit and shard in flight, counts) fresh from a thread; from them, which ranks are alive now."""
from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

from .errors import ConfigError, S2Error
from .fsutil import pid_alive
from .store import Folder, folder

HEARTBEAT_RE = re.compile(r"^rank-(\d{5})\.json$")


def heartbeat_s() -> float:
    """Seconds between heartbeat refreshes (S2CLI_HEARTBEAT_S, default 15)."""
    return float(os.environ.get("S2CLI_HEARTBEAT_S", "15"))


def stale_s() -> float:
    """A running rank whose heartbeat is older than this is stale (S2CLI_STALE_S, default 10 min)."""
    return float(os.environ.get("S2CLI_STALE_S", "600"))


def heartbeat_path(outdir: Path, rank: int) -> Path:
    return Path(outdir) / f"rank-{rank:05d}.json"


def heartbeat_name(rank: int) -> str:
    return f"rank-{rank:05d}.json"


def read_heartbeats(outdir: Path | Folder) -> dict[int, dict[str, Any]]:
    """Each rank's heartbeat in the folder (a local path, or a Folder: local or remote)."""
    d = folder(outdir)
    names = [n for n in d.names() if HEARTBEAT_RE.match(n)]
    out = {}
    for name, text in d.read_texts(names).items():
        try:  # being replaced right now: atomic, so it reappears complete
            out[int(HEARTBEAT_RE.match(name).group(1))] = json.loads(text)  # type: ignore[union-attr]
        except ValueError:
            continue
    return out


def liveness(hb: dict[str, Any] | None, now: float | None = None) -> str:
    """running (alive), stale (says running but its process is gone or silent), done, failed, preempted (stopped
    by a signal: a rerun resumes it), or absent."""
    if hb is None:
        return "absent"
    if hb.get("state") != "running":
        return hb.get("state", "absent")
    now = time.time() if now is None else now
    if hb.get("host") == socket.gethostname() and not pid_alive(int(hb.get("pid", 0))):
        return "stale"
    if now - float(hb.get("updated", 0)) > stale_s():
        return "stale"
    return "running"


class Heartbeat:
    """This rank's `rank-RRRRR.json`, rewritten atomically every `heartbeat_s()` seconds and on every change of
    unit or shard; `close(state)` writes the final state (done, failed or preempted)."""

    def __init__(self, outdir: Path | Folder, rank: int, world: int, source: str):
        self.folder, self.name = folder(outdir), heartbeat_name(rank)
        now = time.time()
        self.data: dict[str, Any] = {
            "rank": rank, "world": world, "source": source, "host": socket.gethostname(), "pid": os.getpid(),
            "state": "running", "started": now, "updated": now, "unit": None, "unit_index": None, "part": None,
            "shard": None, "images": 0, "failed": 0, "shards_written": 0, "error": None}
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._stop = threading.Event()
        self.write()
        self._thread = threading.Thread(target=self._beat, name="s2cli-heartbeat", daemon=True)
        self._thread.start()

    @property
    def path(self) -> Path | str:
        """The heartbeat file (a Path locally, a URL on remote storage)."""
        return self.folder.path / self.name if not self.folder.remote else f"{self.folder.url}/{self.name}"  # type: ignore[operator]

    def update(self, write: bool = False, **fields: Any) -> None:
        with self._lock:
            self.data.update(fields)
        if write:
            self.write()

    def write(self) -> None:
        # one writer at a time: the beat thread and the run's thread share the temporary's name (it is per process)
        with self._write_lock:
            with self._lock:
                self.data["updated"] = time.time()
                text = json.dumps(self.data, sort_keys=True)
            try:
                self.folder.write_text(self.name, text)
            except (OSError, S2Error):  # a full or flaky disk must not stop the extraction; the next beat tries again
                pass

    def _beat(self) -> None:
        while not self._stop.wait(heartbeat_s()):
            self.write()

    def close(self, state: str, error: str | None = None, **fields: Any) -> None:
        """The final state: done, failed, or preempted (`signal`: the signal's name)."""
        self._stop.set()
        self._thread.join(timeout=5)
        self.update(state=state, error=error, unit=None, unit_index=None, part=None, shard=None, write=True, **fields)


def live_ranks(outdir: Path | Folder, me: int | None = None) -> set[int]:
    """Ranks other than `me` whose heartbeat says they are running now: their unmarked shards and temporaries
    are work in progress, never leftovers."""
    return {r for r, hb in read_heartbeats(outdir).items() if r != me and liveness(hb) == "running"}


class RemoteClaim:
    """A claim on one rank of a folder on remote storage, where there are no locks and no atomic create: the
    rank's heartbeat object itself, written with this process's host, pid and a token, then read back. Refused
    while the heartbeat there says another process runs (alive on this host, or refreshed within S2CLI_STALE_S
    elsewhere). Two runs started within the same moment on different hosts can both pass (the store keeps the
    last write): the read-back narrows that window, it cannot close it. `release()` puts back what was there if
    the claim was never followed by a heartbeat (a run refused or failed before it started)."""

    held = True

    def __init__(self, d: Folder, rank: int, what: str, fix: str, world: int | None = None):
        import secrets

        self.folder, self.name = d, heartbeat_name(rank)
        before = d.read_texts([self.name]).get(self.name)
        hb = _parsed(before)
        if liveness(hb) == "running" and (hb["host"], hb["pid"]) != (socket.gethostname(), os.getpid()):  # type: ignore[index]
            raise ConfigError(f"{what} is being written by another run (host {hb['host']} pid {hb['pid']}, its "  # type: ignore[index]
                              f"heartbeat {time.time() - float(hb.get('updated', 0)):.0f} s old)", given=d.url, fix=fix)  # type: ignore[union-attr]
        self.before, self.token = before, secrets.token_hex(8)
        now = time.time()
        d.write_text(self.name, json.dumps({"rank": rank, "world": world, "host": socket.gethostname(), "pid": os.getpid(),
                                            "state": "running", "started": now, "updated": now, "claim": self.token}))
        time.sleep(float(os.environ.get("S2CLI_CLAIM_SETTLE_S", "0.2")))
        back = _parsed(d.read_texts([self.name]).get(self.name)) or {}
        if back.get("claim") != self.token:
            raise ConfigError(f"{what} was claimed by another run at the same moment (host {back.get('host')} "
                              f"pid {back.get('pid')})", given=d.url, fix=fix)

    def release(self) -> None:
        if self.token is None:
            return
        now = _parsed(self.folder.read_texts([self.name]).get(self.name)) or {}
        if now.get("claim") == self.token:  # no heartbeat took over: leave the folder as it was
            if self.before is None:
                self.folder.unlink(self.name)
            else:
                self.folder.write_text(self.name, self.before)
        self.token = None


def _parsed(text: str | None) -> dict[str, Any] | None:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None
