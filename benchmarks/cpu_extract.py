"""CPU timings on the example photos: `s2 extract` end to end vs the bare engine on the same decoded images,
and the fused all-scales call vs the reference's per-scale loop (`s2cli.bench.reference_forward`). Prints a
markdown table.

    python benchmarks/cpu_extract.py [--model efficientnet-lite0] [--scales 1,2] [--repeat 3] [--no-channels-last]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import s2cli
from s2cli import multiscale_forward
from s2cli.bench import reference_forward
from s2cli.extractor import use_channels_last
from s2cli.inputs.decode import decode_sample
from s2cli.inputs.folder import scan_folder
from s2cli.plan import fit_of

ROOT = Path(__file__).parent.parent
ap = argparse.ArgumentParser()
ap.add_argument("--model", default="efficientnet-lite0")
ap.add_argument("--scales", default="1,2")
ap.add_argument("--input", default=str(ROOT / "examples" / "images"))
ap.add_argument("--repeat", type=int, default=3)
ap.add_argument("--batch-size", type=int, default=8)
ap.add_argument("--no-channels-last", action="store_true", help="both sides without channels_last (to compare)")
args = ap.parse_args()
scales = tuple(float(s) for s in args.scales.split(","))
random_init = args.model != "efficientnet-lite0"

cfg = s2cli.settings(args.input, model=args.model, scales=scales, random_init=random_init)
samples = scan_folder(args.input)
bb = s2cli.api.load(cfg)
nhwc = use_channels_last(cfg) and not args.no_channels_last  # as `s2 extract` does, so both sides run the same kernels
if nhwc:
    bb.channels_last()
fit = fit_of(cfg)
images = torch.stack([torch.from_numpy(decode_sample(s, fit).pixels) for s in samples])
mean = torch.tensor(cfg.backbone.mean).view(1, 3, 1, 1)
std = torch.tensor(cfg.backbone.std).view(1, 3, 1, 1)
P, shape = cfg.backbone.num_prefix_tokens, cfg.backbone.output_shape


def engine(reference: bool) -> float:
    t = time.perf_counter()
    with torch.inference_mode():
        for x in images.split(args.batch_size):
            x = (x.float() / 255 - mean) / std
            kw = dict(img_sizes=list(cfg.img_sizes), max_split_size=cfg.max_split_size, num_prefix_token=P,
                      output_shape=shape)
            reference_forward(bb, x, **kw) if reference else multiscale_forward(bb, x, **kw)
    return time.perf_counter() - t


def best(fn, *a) -> float:
    fn(*a)  # warm-up
    return min(fn(*a) for _ in range(args.repeat))


fused, loop = best(engine, False), best(engine, True)
e2e = []
with tempfile.TemporaryDirectory() as tmp:
    for i in range(args.repeat + 1):
        cmd = [sys.executable, "-m", "s2cli", "extract", args.input, "-m", args.model, "--scales", args.scales,
               "-o", f"{tmp}/o{i}.h5", "-b", str(args.batch_size), "-j", "2", "--json", "-q",
               "--channels-last" if nhwc else "--no-channels-last"]
        if random_init:
            cmd.append("--random-init")
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
        e2e.append(json.loads(r.stdout)["seconds"])
e2e_s = min(e2e[1:])
n = len(samples)
print(f"# {args.model}, scales {args.scales}, {n} images, batch {args.batch_size}, channels_last {nhwc}; torch {torch.__version__}, "
      f"{os.cpu_count()} CPUs, {platform.machine()}, {time.strftime('%Y-%m-%d')}")
print("| variant | seconds | img/s | vs bare fused engine |")
print("|---|---|---|---|")
for name, s in [("bare engine, fused call (decoded images in memory)", fused),
                ("bare engine, the reference's per-scale loop (reference_forward)", loop),
                ("`s2 extract` end to end (read, decode, fit, forward, write)", e2e_s)]:
    print(f"| {name} | {s:.3f} | {n / s:.2f} | {s / fused:.2f}x |")
