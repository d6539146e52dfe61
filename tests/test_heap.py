"""The decode workers' heap (`heap.keep_freed_memory`): an image's buffers freed and allocated again reuse the same
pages, where glibc's default gives them back to the system (the heap trimmed, or each mapped afresh) and every page
faults again for the next image."""
from __future__ import annotations

import subprocess
import sys

import pytest

CHILD = """
import resource, sys
import numpy as np
from s2cli.heap import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(30):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    # an image's buffers as a decode worker has them (decoded, resize passes, arrays: ~3-4 MB each), then freed
    a = [np.ones(n, np.uint8) for n in (3 << 20, 3_100_000, 3_900_000, 3 << 20)]
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    del a
print(applied, sum(faults[10:]) / 20)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_freed_memory_is_reused_without_page_faults():
    def faults(mode: str) -> tuple[str, float]:
        out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True).stdout.split()
        return out[0], float(out[1])

    applied, kept = faults("keep")
    _, default = faults("default")
    assert applied == "True"
    assert kept < 20 and default > 1000, (kept, default)  # 13 MB = 3,200 pages


WORKERS = """
import resource
from s2cli.bench import synthetic_jpegs
from s2cli.inputs.decode import Fit
from s2cli.inputs.loader import DecodeLoader
from s2cli.inputs.samples import Sample

samples = [Sample(s.key, "mem", data=s.data) for s in synthetic_jpegs(16, (768, 1024))]
with DecodeLoader(Fit("crop", 1008, (0.5, 0.5, 0.5)), workers=1) as loader:
    recs = [rec for _, rec in loader.map(samples, lambda s: s)]
assert all(r.pixels is not None for r in recs), [r.error for r in recs]
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt / len(recs))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_decode_workers_reuse_their_memory_image_after_image():
    """A decode worker's page faults per 1024x768 JPEG fitted to 1008: the shared-memory pages that carry its pixels
    to the run (744 of 4 KB) and little else; each image's decode and resize buffers mapped afresh would add
    several times as many."""
    out = subprocess.run([sys.executable, "-c", WORKERS], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.split()[-1]) < 1800
