"""Ranks sharing an output folder: each rank keeps a heartbeat file `rank-RRRRR.json` (host, pid, state, the
unit and shard in flight, counts), refreshed by a thread; from them, which ranks are alive, which leftovers are
safe to remove, and the `s2 status` report (shards, images, failures, per-rank progress, units in flight or stale)."""
from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

from .sinks import OutputDir, _alive, atomic_write_text

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
    """running (alive), stale (says running but its process is gone or silent), done, failed, or absent."""
    if hb is None:
        return "absent"
    if hb.get("state") != "running":
        return hb.get("state", "absent")
    now = time.time() if now is None else now
    if hb.get("host") == socket.gethostname() and not _alive(int(hb.get("pid", 0))):
        return "stale"
    if now - float(hb.get("updated", 0)) > stale_s():
        return "stale"
    return "running"


class Heartbeat:
    """This rank's `rank-RRRRR.json`, rewritten atomically every `heartbeat_s()` seconds and on every change of
    unit or shard; `close(state)` writes the final state (done or failed)."""

    def __init__(self, outdir: Path, rank: int, world: int, source: str):
        self.path = heartbeat_path(outdir, rank)
        now = time.time()
        self.data: dict[str, Any] = {
            "rank": rank, "world": world, "source": source, "host": socket.gethostname(), "pid": os.getpid(),
            "state": "running", "started": now, "updated": now, "unit": None, "unit_index": None, "part": None,
            "shard": None, "images": 0, "failed": 0, "shards_written": 0, "error": None}
        self._lock = threading.Lock()
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
        with self._lock:
            self.data["updated"] = time.time()
            text = json.dumps(self.data, sort_keys=True)
        try:
            atomic_write_text(self.path, text)
        except OSError:  # a full or flaky disk must not stop the extraction; the next beat tries again
            pass

    def _beat(self) -> None:
        while not self._stop.wait(heartbeat_s()):
            self.write()

    def close(self, state: str, error: str | None = None) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.update(state=state, error=error, unit=None, unit_index=None, part=None, shard=None, write=True)


def live_ranks(outdir: Path, me: int | None = None) -> set[int]:
    """Ranks other than `me` whose heartbeat says they are running now: their unmarked shards and temporaries
    are work in progress, never leftovers."""
    return {r for r, hb in read_heartbeats(outdir).items() if r != me and liveness(hb) == "running"}


# ---- s2 status ------------------------------------------------------------------------------------------------
def status_report(path: str | os.PathLike) -> dict[str, Any]:
    """What an output folder says about its run: totals, per-rank progress and units in flight or stale."""
    from .errors import ConfigError

    d = OutputDir(path)
    if not d.run_file.is_file():
        raise ConfigError("not an s2cli output folder (no run.json)", given=str(path),
                          fix="pass the folder given to `s2 extract -o OUTDIR/` or `s2 slurm -o OUTDIR`")
    run = json.loads(d.run_file.read_text())
    markers = d.markers()
    now = time.time()
    hbs = read_heartbeats(d.path)
    inp = run.get("input", {})
    units_total = inp.get("units")
    shard_size = run.get("config", {}).get("shard_size")
    by_unit: dict[int, list[dict]] = {}
    for m in markers:
        by_unit.setdefault(m["unit_index"], []).append(m)
    units_done = 0
    for parts in by_unit.values():
        if inp.get("kind") == "wds":
            last = [m["part"] for m in parts if m.get("last_part")]
            units_done += bool(last) and {m["part"] for m in parts} >= set(range(last[0] + 1))
        else:
            units_done += 1  # a folder/list unit is one part
    shards_total = units_total if inp.get("kind") in ("folder", "list") else None
    ranks = []
    for r in sorted(set(hbs) | {m.get("rank", 0) for m in markers}):
        hb = hbs.get(r)
        mine = [m for m in markers if m.get("rank", 0) == r]
        state = liveness(hb, now)
        row = {"rank": r, "state": state, "host": hb and hb.get("host"), "pid": hb and hb.get("pid"),
               "world": hb and hb.get("world"), "shards": len(mine), "images": sum(m["num_images"] for m in mine),
               "failed": sum(m["num_failed"] for m in mine),
               "updated_s_ago": None if hb is None else round(now - float(hb.get("updated", now)), 1),
               "in_flight": None, "images_per_s": None, "error": hb and hb.get("error")}
        if hb is not None:
            elapsed = float(hb.get("updated", now)) - float(hb.get("started", now))
            row["images_per_s"] = round(hb.get("images", 0) / elapsed, 3) if elapsed > 0 else None
            if hb.get("unit") is not None and state in ("running", "stale"):
                row["in_flight"] = {k: hb.get(k) for k in ("unit", "unit_index", "part", "shard")}
        ranks.append(row)
    spans = [(m["started_at"], m["finished_at"]) for m in markers if "started_at" in m and "finished_at" in m]
    images = sum(m["num_images"] for m in markers)
    wall = (max(e for _, e in spans) - min(s for s, _ in spans)) if spans else 0
    manifest = d.path / "manifest.json"
    return {
        "output": str(d.path), "input": inp.get("spec"), "kind": inp.get("kind"),
        "units_done": units_done, "units_total": units_total, "shards_done": len(markers), "shards_total": shards_total,
        "shard_size": shard_size, "images": images, "failed": sum(m["num_failed"] for m in markers),
        "images_per_s": round(sum(m["num_images"] for m in markers if "finished_at" in m) / wall, 3) if wall > 0 else None,
        "images_per_s_now": round(sum(x["images_per_s"] or 0 for x in ranks if x["state"] == "running"), 3),
        "complete": units_total is not None and units_done >= units_total,
        "manifest_complete": bool(manifest.is_file() and json.loads(manifest.read_text()).get("complete")),
        "ranks": ranks,
        "in_flight": [dict(rank=x["rank"], **x["in_flight"]) for x in ranks if x["in_flight"] and x["state"] == "running"],
        "stale": [dict(rank=x["rank"], host=x["host"], pid=x["pid"], **(x["in_flight"] or {})) for x in ranks
                  if x["state"] == "stale"],
    }
