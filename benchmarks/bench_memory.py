"""Peak memory of one batch through the single-scale forward, our S² (one call, and chunked to the batch size),
and the reference's forward and its split_forward, via `s2cli.bench.memory_figures`. Prints a markdown table.

    python benchmarks/bench_memory.py [--batch 32] [--tiny-batch 8]

Rows: CLIP ViT-L/14-336 (timm, random init) in bf16 on the meta device, i.e. LLaVA-1.5-S2's setting counted from
tensor shapes and lifetimes without computing anything; and timm ViT-Ti/16 in fp32, run for real on the CPU.
On the CPU and meta devices the figures are bytes of live tensors (LiveTensorBytes, op granularity), not GPU
allocator figures; "held" is the weights plus the forward's input.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import timm
import torch

from s2cli.bench import memory_figures, peak_memory
from s2cli.extractor import normalize_images

ap = argparse.ArgumentParser()
ap.add_argument("--batch", type=int, default=32)
ap.add_argument("--tiny-batch", type=int, default=8)
args = ap.parse_args()

runs = [("CLIP ViT-L/14-336, bf16, meta device (counted, not run)", "vit_large_patch14_clip_336", 336, torch.bfloat16,
         "meta", args.batch),
        ("ViT-Ti/16, fp32, CPU (run)", "vit_tiny_patch16_224", 224, torch.float32, "cpu", args.tiny_batch)]
print(f"# `python {' '.join(sys.argv)}`; torch {torch.__version__}, {os.cpu_count()} CPUs, {platform.machine()}, "
      f"{time.strftime('%Y-%m-%d')}; scales 1,2,3 (14 tiles per image), 1 prefix token (CLS), forward_features")
print("| model | batch | forward | held (MiB) | working (MiB) | peak (MiB) | vs single scale |")
print("|---|---|---|---|---|---|---|")
for title, name, side, dtype, device, batch in runs:
    torch.manual_seed(0)
    with torch.device(device):
        model = timm.create_model(name, pretrained=False).eval().to(dtype)
        x = torch.randn(batch, 3, 3 * side, 3 * side, dtype=dtype)
    r = memory_figures(model.forward_features, x, [*model.parameters(), *model.buffers()], torch.device(device),
                       img_sizes=[side, 2 * side, 3 * side], max_split_size=side, split_mode="resize",
                       resize_output_to_idx=0, num_prefix_token=1, output_shape="bnc", antialias=False)
    # what `s2 extract` does before the forward: the uint8 batch at the largest scale's fit -> normalized, in the
    # compute dtype (s2cli.extractor.normalize_images), with the weights held; and the out-of-place way it replaced
    with torch.device(device):
        u8 = torch.empty(batch, 3, 3 * side, 3 * side, dtype=torch.uint8)
        mean, std = torch.zeros(3, 1, 1), torch.ones(3, 1, 1)
    held = [*model.parameters(), *model.buffers(), u8]
    r["preprocess (normalize_images)"] = peak_memory(lambda: normalize_images(u8, mean, std, dtype), held)

    def before() -> torch.Tensor:  # the Extractor's code before normalize_images, line for line
        x = u8.float().div_(255)
        return ((x - mean) / std).to(dtype)

    r["preprocess, out of place (before)"] = peak_memory(before, held)
    for k in ("preprocess (normalize_images)", "preprocess, out of place (before)"):
        r[k]["vs_single_scale"] = r[k]["peak"] / r["single_scale"]["peak"]
    for variant, m in r.items():
        print(f"| {title} | {batch} | {variant} | {m['held'] / 2 ** 20:.1f} | {m['working'] / 2 ** 20:.1f} | "
              f"{m['peak'] / 2 ** 20:.1f} | {m['vs_single_scale']:.2f}x |")
