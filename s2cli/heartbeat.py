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

from .errors import S2Error
from .fsutil import atomic_write_text, pid_alive

HEARTBEAT_RE = re.compile(r"^rank-(\d{5})\.json$")


def heartbeat_s() -> float:
    """Seconds between heartbeat refreshes (S2CLI_HEARTBEAT_S, default 15)."""
    return float(os.environ.get("S2CLI_HEARTBEAT_S", "15"))


def stale_s() -> float:
    """A running rank whose heartbeat is older than this is stale (S2CLI_STALE_S, default 10 min)."""
    return float(os.environ.get("S2CLI_STALE_S", "600"))


def heartbeat_path(outdir: Path, rank: int) -> Path:
    return Path(outdir) / f"rank-{rank:05d}.json"


def read_heartbeats(outdir: Path) -> dict[int, dict[str, Any]]:
    out = {}
    for p in Path(outdir).glob("rank-*.json"):
        m = HEARTBEAT_RE.match(p.name)
        if not m:
            continue
        try:
            out[int(m.group(1))] = json.loads(p.read_text())
        except (OSError, ValueError):  # being replaced right now: atomic, so it reappears complete
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

    def __init__(self, outdir: Path, rank: int, world: int, source: str):
        self.path = heartbeat_path(outdir, rank)
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
                atomic_write_text(self.path, text)
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


def live_ranks(outdir: Path, me: int | None = None) -> set[int]:
    """Ranks other than `me` whose heartbeat says they are running now: their unmarked shards and temporaries
    are work in progress, never leftovers."""
    return {r for r, hb in read_heartbeats(outdir).items() if r != me and liveness(hb) == "running"}
