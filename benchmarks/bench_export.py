"""`s2 export` on N pooled vectors: the bulk reads it does now against the per-key reads it did before
(`Reader.vector_blocks` of the base class: one h5py read per image for the vector and one per metadata field).

    python benchmarks/bench_export.py --images 50000 --dim 1024

Writes a synthetic HDF5 file of N pooled vectors with s2cli's own writer (pool-only layout) in a temporary folder,
then times: per-key vectors + metadata (the old way), and export_embeddings (bulk, normalised float16 + parquet)."""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

import s2cli
from s2cli.export import export_embeddings
from s2cli.formats.hdf5 import HDF5Sink
from s2cli.items import Layout, StoredItem
from s2cli.readers import Reader


def write(path: Path, n: int, dim: int) -> None:
    sink = HDF5Sink(path, {"num_prefix_tokens": 0}, Layout(channels=dim, num_scales=1, tokens=None, dtype="float32",
                                                           features=False, pooled=True))
    rng = np.random.default_rng(0)
    for a in range(0, n, 4096):
        vec = rng.standard_normal((min(4096, n - a), dim)).astype(np.float32)
        sink.write([StoredItem(key=f"{a + i:08d}", source=f"/data/{a + i:08d}.jpg", meta=None, orig_hw=(480, 640),
                               grid_hw=(24, 24), img_sizes=[(336, 336)], num_prefix_tokens=0, split_mode="resize",
                               pooled=v) for i, v in enumerate(vec)])
    sink.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=1024)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pooled.h5"
        write(path, args.images, args.dim)
        with s2cli.open_features(path) as r:
            t = time.perf_counter()
            n = sum(len(k) for k, _, _ in Reader.vector_blocks(r, "pooled"))
            per_key = time.perf_counter() - t
        with s2cli.open_features(path) as r:
            t = time.perf_counter()
            s = export_embeddings(r, Path(tmp) / "emb")
            bulk = time.perf_counter() - t
    assert n == s["num_images"] == args.images
    print(json.dumps({"images": args.images, "dim": args.dim, "per_key_read_s": round(per_key, 2),
                      "export_bulk_s": round(bulk, 2), "speedup": round(per_key / bulk, 1)}))


if __name__ == "__main__":
    main()
