"""Decode throughput of the decode stage, and its process's CPU per image: torch's DataLoader (this s2cli's
`inputs/loader.py`) against the hand-written pool it replaced (`inputs/pool.py` at ace3bba, from a git-archived
tree), on the same JPEG files, the same fit, the same workers and window, each run in a fresh process, the two
alternated.

    python benchmarks/bench_decode.py [--images 120] [--side 1008] [--workers 2] [--batch-size 8] [--repeat 2]
    python benchmarks/bench_decode.py --baseline /tmp/s2-base   # `git archive REV s2cli | tar -x -C /tmp/s2-base`

Without --baseline the pool's tree is archived from this repository at --rev (ace3bba). Each run times the stage
from its construction (its workers started) to its last record, as a run sees it; the box's load average is
printed beside each run (the box may be shared).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import torch  # imported as in a run
from s2cli.inputs.decode import Fit
from s2cli.inputs.samples import Sample

folder, side, workers, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
samples = [Sample(p.stem, str(p)) for p in sorted(__import__("pathlib").Path(folder).glob("*.jpg"))]
fit = Fit("crop", side, (0.5, 0.5, 0.5))
try:
    from s2cli.inputs.loader import DecodeLoader
    make, stage = lambda: DecodeLoader(fit, workers, batch_size=batch), "dataloader"
except ImportError:  # the tree before it: the pool, with the window the run gave it
    from s2cli.inputs.pool import DecodePool
    make, stage = lambda: DecodePool(fit, workers, window=max(4 * workers, 2 * batch)), "pool"


def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


t0, c0 = time.perf_counter(), cpu()
n = 0
with make() as dec:
    for _, rec in dec.map(samples, lambda s: s):
        err, img = (rec["error"], rec["image"]) if isinstance(rec, dict) else (rec.error, rec.pixels)  # ace3bba: dicts
        assert err is None and img.shape == (3, side, side), err
        n += 1
wall = time.perf_counter() - t0
print(json.dumps({"stage": stage, "img_s": n / wall, "cpu_ms": (cpu() - c0) * 1000 / n, "n": n}))
"""


def load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=120)
    ap.add_argument("--side", type=int, default=1008)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--baseline", default=None, help="a folder holding the s2cli with the pool")
    ap.add_argument("--rev", default="ace3bba", help="without --baseline: the revision archived as the baseline")
    args = ap.parse_args()
    here = str(Path(__file__).resolve().parent.parent)
    from s2cli.bench import synthetic_jpegs

    with tempfile.TemporaryDirectory() as tmp:
        base = args.baseline
        if base is None:
            base = f"{tmp}/base"
            os.makedirs(base)
            archive = subprocess.run(["git", "-C", here, "archive", args.rev, "s2cli"], capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", base], input=archive.stdout, check=True)
        folder = Path(tmp) / "jpegs"
        folder.mkdir()
        for s in synthetic_jpegs(args.images, (768, 1024)):
            (folder / f"{s.key}.jpg").write_bytes(s.data)
        rows: dict[str, list[dict]] = {"pool": [], "dataloader": []}
        for r in range(args.repeat):
            for code in (base, here):
                before = load()
                p = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(args.side), str(args.workers),
                                    str(args.batch_size)], capture_output=True, text=True,
                                   env={**os.environ, "PYTHONPATH": code}, cwd=tmp)  # not this tree's s2cli
                if p.returncode:
                    sys.exit(p.stderr)
                row = {**json.loads(p.stdout.splitlines()[-1]), "load": f"{before}-{load()}"}
                assert row["stage"] == ("pool" if code == base else "dataloader"), (code, row)
                rows[row["stage"]].append(row)
                print(f"repeat {r}: {row}", file=sys.stderr)
    print(f"| decode stage | img/s (-j {args.workers}) | its process's CPU-ms per image | load average during runs |")
    print("|---|---|---|---|")
    for stage, name in (("pool", f"hand-written pool ({args.rev if args.baseline is None else args.baseline})"),
                        ("dataloader", "torch DataLoader (this tree)")):
        rate = [x["img_s"] for x in rows[stage]]
        ms = [x["cpu_ms"] for x in rows[stage]]
        loads = ", ".join(x["load"] for x in rows[stage])
        print(f"| {name} | {min(rate):.2f}-{max(rate):.2f} | {min(ms):.2f}-{max(ms):.2f} | {loads} |")


if __name__ == "__main__":
    main()
