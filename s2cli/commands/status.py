"""`s2 status`: the progress of a run in an output folder, per rank."""
from __future__ import annotations

import json
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from . import options as o
from ._common import entries, out, reported


def status(
    path: Annotated[str, typer.Argument(help="An output folder (s2 extract -o OUTDIR/, s2 slurm -o OUTDIR).")],
    as_json: o.Json = False,
) -> None:
    """Progress of a run in an output folder: shards and units done, images, failures, throughput, each rank's
    state (running, done, failed, preempted: stopped by SIGTERM/SIGUSR1, a rerun resumes; or stale: it stopped
    without saying so) and the units in flight.

    Example:  s2 status feats/
    """
    from ..status import status_report

    with reported():
        st = status_report(path)
    if as_json:
        print(json.dumps(st))
        return
    out.print(f"{st['output']} ({st['input']})", highlight=False, soft_wrap=False)
    t = Table(box=box.SIMPLE_HEAD)
    for c in ("rank", "state", "host:pid", "shards", "entries", "failed", "img/s", "updated"):
        t.add_column(c, overflow="fold", no_wrap=c != "host:pid")  # at 80 columns a long host name wraps
    for r in st["ranks"]:
        t.add_row(str(r["rank"]), r["state"], f"{r['host'] or '-'}:{r['pid'] or '-'}", str(r["shards"]),
                  str(r["images"]), str(r["failed"]), str(r["images_per_s"] or "-"),
                  "-" if r["updated_s_ago"] is None else f"{r['updated_s_ago']}s ago")
    out.print(t)
    for r in st["ranks"]:  # a line each, wrapped at spaces: a unit's name is as long as its path
        if (fl := r["in_flight"]) is not None:
            out.print(f"rank {r['rank']} in flight: {fl['unit']} part {fl['part']} -> {fl['shard']}", highlight=False,
                      soft_wrap=False)
    total = "?" if st["shards_total"] is None else st["shards_total"]
    out.print(f"shards {st['shards_done']}/{total}, units {st['units_done']}/{st['units_total']}, {entries(st['images'])}, "
              f"{st['failed']} failed, {st['images_per_s'] or '-'} img/s overall, {st['images_per_s_now']} img/s now; "
              f"{'complete' if st['complete'] else 'not complete'}", highlight=False, soft_wrap=False)
    for b in st["broken_shards"]:
        out.print(f"broken: {b['shard']} ({b['unit']}): {b['why']}; not counted, rerun the same command to redo it",
                  highlight=False)
    for s in st["stale"]:
        out.print(f"stale: rank {s['rank']} ({s['host']} pid {s['pid']}) stopped in {s.get('unit') or 'no unit'}; "
                  f"rerun the same command (or resubmit) to redo it", highlight=False)
    for p in st["preempted"]:
        out.print(f"preempted: rank {p['rank']} ({p['host']}) stopped on {p['signal']}, its finished shards kept; "
                  f"rerun the same command (or resubmit) to resume", highlight=False)
    for r in st["ranks"]:
        if r["state"] == "failed":
            out.print(f"rank {r['rank']} failed: {r['error']}", highlight=False)


