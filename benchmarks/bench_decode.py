"""Decode throughput of the decode pool, and the parent's CPU per image, with the decoded pixels coming back
through a pipe (pickled) or through shared memory (torch tensors): the same synthetic JPEGs, the same fit, the
two ways alternated in one run.

    python benchmarks/bench_decode.py [--images 120] [--side 1008] [--workers 2] [--repeat 2]
"""
from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch  # noqa: F401  (imported as in a run: the pool sends tensors through shared memory only then)
from PIL import Image

from s2cli.inputs.decode import Fit
from s2cli.inputs.pool import DecodePool
from s2cli.inputs.samples import Sample

ap = argparse.ArgumentParser()
ap.add_argument("--images", type=int, default=120)
ap.add_argument("--side", type=int, default=1008)
ap.add_argument("--workers", type=int, default=2)
ap.add_argument("--repeat", type=int, default=2)
args = ap.parse_args()


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run(samples: list[Sample], shm: bool) -> tuple[float, float]:
    os.environ["S2CLI_DECODE_SHM"] = "1" if shm else "0"
    with DecodePool(Fit("crop", args.side, (0.5, 0.5, 0.5)), args.workers) as pool:
        assert pool.shared == shm
        list(pool.map(samples[:4], lambda s: s))  # workers started and warm
        t0, c0 = time.perf_counter(), cpu()
        n = 0
        for _, rec in pool.map(samples, lambda s: s):
            assert rec.error is None and rec.pixels.shape == (3, args.side, args.side)
            n += 1
        return n / (time.perf_counter() - t0), (cpu() - c0) * 1000 / n


with tempfile.TemporaryDirectory() as d:
    rng = np.random.default_rng(0)
    samples = []
    for i in range(args.images):
        p = Path(d) / f"{i:04d}.jpg"
        Image.fromarray(rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8)).save(p, quality=90)
        samples.append(Sample(f"{i:04d}", str(p)))
    rows = {False: [], True: []}
    for _ in range(args.repeat):
        for shm in (False, True):
            rows[shm].append(run(samples, shm))
    print(f"| pixels back through | img/s (-j {args.workers}) | parent CPU-ms per image |")
    print("|---|---|---|")
    for shm, name in ((False, "a pipe (pickled numpy)"), (True, "shared memory (torch tensors)")):
        rate = [r for r, _ in rows[shm]]
        ms = [m for _, m in rows[shm]]
        print(f"| {name} | {min(rate):.1f}-{max(rate):.1f} | {min(ms):.2f}-{max(ms):.2f} |")
