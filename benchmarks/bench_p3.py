"""Target P3 on this CPU: `s2 extract` end to end on a tiny model vs the bare batched `multiscale_forward` over the
same decoded images (target <= 1.15x), for a few decode-worker counts (-j), via `s2 bench --json`. Prints a
markdown table with the stage split (busy seconds of each stage; the main thread's waits).

    python benchmarks/bench_p3.py [--model timm:vit_tiny_patch16_224] [--layer 2] [--images 16] [--jobs 0,1,2] [--compile]
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
ap.add_argument("--layer", default="2")
ap.add_argument("--scales", default="1,2")
ap.add_argument("--images", type=int, default=16)
ap.add_argument("--batch-size", type=int, default=8)
ap.add_argument("--jobs", default="0,1,2")
ap.add_argument("--compile", action="store_true")
args = ap.parse_args()

rows = []
for j in args.jobs.split(","):
    cmd = [sys.executable, "-m", "s2cli", "bench", "-m", args.model, "--random-init", "--layer", args.layer,
           "--scales", args.scales, "--images", str(args.images), "-b", str(args.batch_size), "-j", j, "--json"]
    if args.compile:
        cmd.append("--compile")
    r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    rows.append((j, r))

r0 = rows[0][1]
print(f"# {args.model} layer {args.layer}, scales {args.scales}, {args.images} synthetic 1024x768 JPEGs, batch "
      f"{args.batch_size}{', compiled' if args.compile else ''}; {r0['flops_per_image'] / 1e9:.2f} GFLOP/img; torch "
      f"{torch.__version__}, {os.cpu_count()} CPUs, {platform.machine()}, {time.strftime('%Y-%m-%d')}")
print("| -j | torch threads | e2e img/s | model-only img/s | e2e / model-only | P3 (<=1.15x) | "
      "read / decode / fit (busy s) | preprocess / forward (s) | write (busy s) | main waits decode / write (s) |")
print("|---|---|---|---|---|---|---|---|---|---|")
for j, r in rows:
    st, wt = r["stage_seconds"], r["wait_seconds"]
    print(f"| {j} | {r['torch_threads']} | {r['e2e_img_s']:.2f} | {r['model_only_img_s']:.2f} | "
          f"{r['e2e_over_model_only']:.3f}x | {'met' if r['e2e_over_model_only'] <= 1.15 else 'missed'} | "
          f"{st['read']:.3f} / {st['decode']:.3f} / {st['fit']:.3f} | {st['preprocess']:.3f} / {st['forward']:.3f} | "
          f"{st['write']:.3f} | {wt['decode']:.3f} / {wt['write']:.3f} |")
