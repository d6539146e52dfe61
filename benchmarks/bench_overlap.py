"""How close `s2 extract` comes to the bare engine on this CPU: end to end on a tiny model vs the bare batched
`multiscale_forward` over the
same decoded images (aim: within 1.15x), via `s2 bench --json`, for several ways of sharing the cores between the
forward and decoding. Prints a markdown table with the stage split (busy seconds of each stage; the main
thread's waits).

    python benchmarks/bench_overlap.py [--model timm:vit_tiny_patch16_224] [--layers 2,-1] [--images 128] \
        [--variants "j0;j2,nice=0;j2;j2,omp=passive"] [--repeat 2] [--compile]

A variant is `jN` (decode workers) plus optional `nice=N` (S2CLI_DECODE_NICE: how much lower the decode workers
run; default: the shipped default) and `omp=passive|active` (OMP_WAIT_POLICY of the run, which also applies to
the model-only baseline it is compared with). Each variant runs `--repeat` times; the best e2e run is shown,
and every ratio is also given against the best model-only throughput of any variant with the same model, so a
setting that slows the forward itself cannot look good by slowing its own baseline.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="timm:vit_tiny_patch16_224")
ap.add_argument("--layers", default="2,-1", help="comma-separated --layer values (2 = 3 blocks, -1 = all 12)")
ap.add_argument("--scales", default="1,2")
ap.add_argument("--images", type=int, default=128)
ap.add_argument("--batch-size", type=int, default=8)
ap.add_argument("--variants", default="j0;j2,nice=0;j2")
ap.add_argument("--repeat", type=int, default=2)
ap.add_argument("--compile", action="store_true")
args = ap.parse_args()


def parse(variant: str) -> tuple[str, dict[str, str]]:
    parts = variant.split(",")
    env = {}
    for p in parts[1:]:
        k, v = p.split("=")
        env[{"nice": "S2CLI_DECODE_NICE", "omp": "OMP_WAIT_POLICY"}[k]] = v.upper() if k == "omp" else v
    return parts[0].lstrip("j"), env


def bench(layer: str, jobs: str, env: dict[str, str]) -> dict:
    cmd = [sys.executable, "-m", "s2cli", "bench", "-m", args.model, "--random-init", "--layer", layer,
           "--scales", args.scales, "--images", str(args.images), "-b", str(args.batch_size), "-j", jobs, "--json"]
    if args.compile:
        cmd.append("--compile")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, **env}).stdout
    return json.loads(out)


rows = []
for layer in args.layers.split(","):
    for rep in range(args.repeat):  # repeats interleaved, so a burst of load elsewhere hits every variant alike
        for v in args.variants.split(";"):
            jobs, env = parse(v)
            rows.append((layer, v, bench(layer, jobs, env)))

r0 = rows[0][2]
print(f"# {args.model}, scales {args.scales}, {args.images} synthetic 1024x768 JPEGs, batch {args.batch_size}"
      f"{', compiled' if args.compile else ''}; torch {torch.__version__}, {os.cpu_count()} CPUs, {platform.machine()}, "
      f"{time.strftime('%Y-%m-%d')}; best of {args.repeat} per variant")
print("| layer | GFLOP/img | variant | e2e img/s | model-only img/s | e2e / own model-only | e2e / best model-only | "
      "within 1.15x | read / decode / fit (busy s) | preprocess / forward (s) | write (busy s) | main waits decode / write (s) |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for layer in args.layers.split(","):
    mine = [(v, r) for lay, v, r in rows if lay == layer]
    best_model = max(r["model_only_img_s"] for _, r in mine)
    for v in dict.fromkeys(v for v, _ in mine):
        r = max((r for w, r in mine if w == v), key=lambda r: r["e2e_img_s"])
        st, wt = r["stage_seconds"], r["wait_seconds"]
        vs_best = best_model / r["e2e_img_s"]
        print(f"| {layer} | {r['flops_per_image'] / 1e9:.2f} | {v} | {r['e2e_img_s']:.2f} | {r['model_only_img_s']:.2f} | "
              f"{r['e2e_over_model_only']:.3f}x | {vs_best:.3f}x | {'yes' if vs_best <= 1.15 else 'no'} | "
              f"{st['read']:.3f} / {st['decode']:.3f} / {st['fit']:.3f} | {st['preprocess']:.3f} / {st['forward']:.3f} | "
              f"{st['write']:.3f} | {wt['decode']:.3f} / {wt['write']:.3f} |")
