"""The `s2 status` report: what an output folder says about its run, from its done markers and the ranks'
heartbeats: totals, per-rank progress, and units in flight, stale or preempted."""
from __future__ import annotations

import os
import time
from typing import Any

from .heartbeat import liveness, read_heartbeats
from .outdir import OutputDir, unit_complete


def status_report(path: str | os.PathLike) -> dict[str, Any]:
    """What an output folder says about its run: totals, per-rank progress and units in flight or stale."""
    d = OutputDir(path)
    run = d.read_run(fix="pass the folder given to `s2 extract -o OUTDIR/` or `s2 slurm -o OUTDIR`")
    try:  # one look: the markers, the manifest, and the broken shards (not counted; a rerun redoes them)
        snap = d.snapshot()
    finally:
        d.folder.close()  # a remote shard fetched to check its bytes (its identity changed): out of the cache
    markers, broken = snap.good, snap.broken
    now = time.time()
    hbs = read_heartbeats(d.folder)
    inp = run.get("input", {})
    units_total = inp.get("units")
    written = snap.manifest
    if written.get("units_total") is not None:  # --limit on shards: the run ends in an earlier unit, as it said
        units_total = min(units_total, written["units_total"]) if units_total is not None else written["units_total"]
    shard_size = run.get("config", {}).get("shard_size")
    by_unit: dict[int, list[dict]] = {}
    for m in markers:
        by_unit.setdefault(m["unit_index"], []).append(m)
    # a listed unit is one part (units are cut at the shard size); a streamed unit's count its last marker gives
    # (run.json written before it said `streamed`: a streamed input's total was unknown)
    streamed = inp.get("streamed", inp.get("total") is None)
    units_done = sum(unit_complete(parts, None if streamed else 1) for parts in by_unit.values())
    shards_total = units_total if not streamed else None
    ranks = []
    for r in sorted(set(hbs) | {m.get("rank", 0) for m in markers}):
        hb = hbs.get(r)
        mine = [m for m in markers if m.get("rank", 0) == r]
        state = liveness(hb, now)
        row = {"rank": r, "state": state, "host": hb and hb.get("host"), "pid": hb and hb.get("pid"),
               "world": hb and hb.get("world"), "shards": len(mine), "images": sum(m["num_images"] for m in mine),
               "failed": sum(m["num_failed"] for m in mine),
               "updated_s_ago": None if hb is None else round(now - float(hb.get("updated", now)), 1),
               "in_flight": None, "images_per_s": None, "error": hb and hb.get("error"), "signal": hb and hb.get("signal")}
        if hb is not None:
            elapsed = float(hb.get("updated", now)) - float(hb.get("started", now))
            row["images_per_s"] = round(hb.get("images", 0) / elapsed, 3) if elapsed > 0 else None
            if hb.get("unit") is not None and state in ("running", "stale"):
                row["in_flight"] = {k: hb.get(k) for k in ("unit", "unit_index", "part", "shard")}
        ranks.append(row)
    spans = [(m["started_at"], m["finished_at"]) for m in markers if "started_at" in m and "finished_at" in m]
    images = sum(m["num_images"] for m in markers)
    wall = (max(e for _, e in spans) - min(s for s, _ in spans)) if spans else 0
    return {
        "output": str(d.path), "input": inp.get("spec"), "kind": inp.get("kind"),
        "units_done": units_done, "units_total": units_total, "shards_total": shards_total,
        "shards_done": sum("retry_of" not in m for m in markers), "retry_shards": sum("retry_of" in m for m in markers),
        "shard_size": shard_size, "images": images, "failed": sum(m["num_failed"] for m in markers),
        "images_per_s": round(sum(m["num_images"] for m in markers if "finished_at" in m) / wall, 3) if wall > 0 else None,
        "images_per_s_now": round(sum(x["images_per_s"] or 0 for x in ranks if x["state"] == "running"), 3),
        "complete": units_total is not None and units_done >= units_total and not broken,
        "manifest_complete": bool(written.get("complete")),
        "broken_shards": [{"shard": m["shard"], "unit": m.get("unit"), "why": m["broken"]} for m in broken],
        "ranks": ranks,
        "in_flight": [dict(rank=x["rank"], **x["in_flight"]) for x in ranks if x["in_flight"] and x["state"] == "running"],
        "stale": [dict(rank=x["rank"], host=x["host"], pid=x["pid"], **(x["in_flight"] or {})) for x in ranks
                  if x["state"] == "stale"],
        "preempted": [{"rank": x["rank"], "host": x["host"], "signal": x["signal"]} for x in ranks
                      if x["state"] == "preempted"],
    }
