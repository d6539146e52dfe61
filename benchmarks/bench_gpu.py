"""Issue #7 on one GPU, in one command (< 10 min on an H100, no network, random-init models): correctness of the
fast path, then P1, P2 and memory, printed as a markdown table last (and as JSON with --out).

    python benchmarks/bench_gpu.py [--out gpu.json]     # on the GPU machine
    python benchmarks/bench_gpu.py --smoke              # tiny models, few images, the CPU: checks the script runs

1. correctness: the fast path's features (bf16; channels_last where it applies; compiled; --decode torch) against
   the plain fp32 path on the same images (cosine per image and relative error, bf16 tolerance).
2. P1: the `llava-1.5-s2` recipe (CLIP ViT-L/14-336, 336/672/1008, 14 tiles), bf16, batch 32: `s2cli.bench.bench`
   end to end and model-only, eager (with the reference's per-scale loop on the same model) and --compile.
3. P2: timm vit_base_patch16_224, scales 1,2 (5 tiles), bf16: end to end with --decode pil and --decode torch, and
   decode + fit alone (`s2cli.bench.decode_compare`: ms/image and the pixel difference from Pillow).
4. memory: peak GPU memory of a batch of 32 for LLaVA-S2's model at one scale, at S² (one call), and chunked
   (--max-tiles-per-call 32), from `bench`'s `peak_gpu_bytes`.
Everything is timed by `s2cli.bench` (nothing re-implemented here); --smoke swaps in tiny models of the same
families and skips --compile (inductor takes minutes on a CPU).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

import torch

from s2cli.backbones import load_backbone, resolve
from s2cli.bench import decode_compare, measure, synthetic_jpegs
from s2cli.config import build_config, resolve_config
from s2cli.extractor import Extractor
from s2cli.inputs.decode import decode_sample
from s2cli.launch import resolve_device, resolve_precision
from s2cli.plan import fit_of

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--smoke", action="store_true", help="tiny models, few small images, no --compile (a CPU is enough)")
ap.add_argument("--device", default="auto")
ap.add_argument("--images", type=int, default=None, help="P1 images (default 128; P2 uses 8x as many)")
ap.add_argument("--workers", "-j", type=int, default=None, help="decode workers (default: CPUs - 2)")
ap.add_argument("--no-compile", action="store_true", help="skip the --compile rows")
ap.add_argument("--out", default=None, help="also write every figure as JSON here")
args = ap.parse_args()

device = resolve_device(args.device)
smoke = args.smoke
B = 2 if smoke else 32
n1 = args.images or (4 if smoke else 128)
n2 = 4 if smoke else 8 * n1
hw = (48, 64) if smoke else (768, 1024)
workers = args.workers if args.workers is not None else (0 if smoke else max(1, (os.cpu_count() or 2) - 2))
do_compile = not (smoke or args.no_compile)
TINY_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=56)
P1_SIDE = 56 if smoke else 336  # --smoke: LLaVA-S2's plan (3 scales, 14 tiles) at a toy tile size
t_start = time.perf_counter()
report: dict = {"device": str(device), "torch": torch.__version__, "smoke": smoke, "date": time.strftime("%Y-%m-%d"),
                "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()}


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)


def config(recipe: str | None = None, **flags):
    """A resolved config for a random-init model; in --smoke the alias's architecture at toy width."""
    flags = {"random_init": True, "batch_size": B, "workers": workers, "device": str(device), **flags}
    cfg = build_config("synthetic", "bench.h5", recipe, **flags)
    bb = resolve(cfg.model, layer=cfg.layer, keep_cls=cfg.keep_cls)
    if smoke and bb.family == "hf":
        bb = dataclasses.replace(bb, channels=32, input_size=P1_SIDE, hf_config={**bb.hf_config, **TINY_VIT})
    return resolve_config(cfg, bb)


def p1_config(scales: int = 3, **flags):
    """The llava-1.5-s2 recipe (its first `scales` scales), random-init."""
    sizes = {"img_sizes": tuple(P1_SIDE * k for k in range(1, scales + 1))} if smoke or scales != 3 else {}
    return config("llava-1.5-s2", **sizes, **({"max_split_size": P1_SIDE} if smoke else {}), **flags)


def features(res, backbone, samples, decode: str = "pil"):
    """The run's features of `samples` (the Extractor on decoded, fitted images; --decode torch through the
    device decoder), as fp32 on the CPU."""
    from s2cli.devicepath import decode_batch

    ex = Extractor(res, backbone, device, resolve_precision(res.precision, device))
    fit = dataclasses.replace(fit_of(res), decode=decode)
    recs = [decode_sample(s, fit) for s in samples]
    if decode == "torch":
        decode_batch(recs, fit, device)
    images = [torch.as_tensor(r.pixels) for r in recs]
    feats, _ = ex.features(images, recs[0].plan)
    return feats.float()


def agree(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Per-image cosine similarity and relative error of a against the reference b."""
    cos = torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)
    rel = (a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)
    return {"min_cosine": float(cos.min()), "max_rel_err": float(rel.max())}


BF16_OK = {"min_cosine": 0.99, "max_rel_err": 0.1}  # bf16 keeps ~3 significant digits; 24 layers compound them
checks: list[tuple[str, dict, bool]] = []


def check(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    r = agree(a, b)
    ok = r["min_cosine"] >= BF16_OK["min_cosine"] and r["max_rel_err"] <= BF16_OK["max_rel_err"]
    checks.append((name, r, ok))
    log(f"check {name}: {r} {'ok' if ok else 'FAILED'}")


# ---- P1: LLaVA-1.5-S2 ---------------------------------------------------------------------------------------------
s1 = synthetic_jpegs(n1, hw, seed=1)
p1_fp32 = p1_config()
log(f"P1 model {p1_fp32.backbone.source} ({'tiny' if smoke else 'full size'}), {n1} images {hw[1]}x{hw[0]}, batch {B}, -j {workers}")
m1 = load_backbone(p1_fp32.backbone, random_init=True, seed=0)
few = s1[:min(4, n1)]
ref1 = features(p1_fp32, m1, few)  # fp32 first: the bf16 runs below cast the same weights
p1 = p1_config(precision="bf16")
check("P1 bf16 vs fp32", features(p1, m1, few), ref1)
check("P1 bf16 --decode torch vs fp32 pil", features(p1, m1, few, "torch"), ref1)
rows: list[tuple[str, dict]] = []
log("P1 eager (+ the reference's per-scale loop)")
rows.append(("P1 llava-1.5-s2, bf16, eager", measure(p1, s1, m1, "synthetic")))
if do_compile:
    p1c = p1_config(precision="bf16", compile=True)
    log("P1 --compile (the first batch compiles, excluded)")
    eager_bf16 = features(p1, m1, few)
    rows.append(("P1 llava-1.5-s2, bf16, --compile", measure(p1c, s1, m1, "synthetic")))
    check("P1 bf16 compiled vs fp32", features(p1c, m1, few), ref1)
    check("P1 bf16 compiled vs bf16 eager", features(p1c, m1, few), eager_bf16)

# ---- memory: from the P1 eager run's `memory` figures (s2cli.bench.memory_figures on its first batch) -------------
mem = rows[0][1]["memory"] or {}
del m1
if device.type == "cuda":
    torch.cuda.empty_cache()

# ---- P2: ViT-B/16-224 at scales 1,2, pil vs torch decode -------------------------------------------------------------
s2 = synthetic_jpegs(n2, hw, seed=2)
vit = "timm:test_vit" if smoke else "timm:vit_base_patch16_224"  # test_vit: timm's 160-px toy ViT
p2_fp32 = config(model=vit, scales=(1.0, 2.0))
log(f"P2 {vit}, {n2} images")
m2 = load_backbone(p2_fp32.backbone, random_init=True, seed=0)
few2 = s2[:min(4, n2)]
ref2 = features(p2_fp32, m2, few2)
p2 = dataclasses.replace(p2_fp32, precision="bf16")
check("P2 bf16 vs fp32", features(p2, m2, few2), ref2)
check("P2 bf16 --decode torch vs fp32 pil", features(p2, m2, few2, "torch"), ref2)
for dec in ("pil", "torch"):
    log(f"P2 --decode {dec}")
    res = dataclasses.replace(p2, decode=dec)
    rows.append((f"P2 {vit.split(':')[1]} 1,2, bf16, --decode {dec}", measure(res, s2, m2, "synthetic")))
dc = decode_compare(s2[:min(64, n2)], fit_of(p2), device)
log(f"decode + fit alone: {dc}")

# ---- the table ---------------------------------------------------------------------------------------------------
report.update(checks=[{"name": n, **r, "ok": ok} for n, r, ok in checks], runs={n: r for n, r in rows},
              memory=mem, decode_compare=dc, seconds=round(time.perf_counter() - t_start, 1))
if args.out:
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=1)
gib = 2 ** 30
print(f"\n# bench_gpu {'--smoke ' if smoke else ''}on {report['gpu']} ({device}), torch {torch.__version__}, "
      f"{report['date']}, {report['seconds']} s; random-init weights, synthetic {hw[1]}x{hw[0]} JPEGs, batch {B}, -j {workers}\n")
print("| check (fast path vs plain fp32) | min cosine | max rel err | within bf16 tolerance |")
print("|---|---|---|---|")
for n, r, ok in checks:
    print(f"| {n} | {r['min_cosine']:.5f} | {r['max_rel_err']:.4f} | {'yes' if ok else 'NO'} |")
print("\n| run | images | e2e img/s | model-only img/s | reference loop img/s | e2e / model-only | MFU e2e | "
      "read / decode / fit (busy s) | preprocess / forward (s) | write (s) | waits decode / write (s) | peak GPU GiB |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for n, r in rows:
    st, wt = r["stage_seconds"], r["wait_seconds"]
    ref = "-" if r.get("reference_img_s") is None else f"{r['reference_img_s']:.1f}"
    peak = "-" if r["peak_gpu_bytes"] is None else f"{r['peak_gpu_bytes'] / gib:.2f}"
    print(f"| {n} | {r['images']} | {r['e2e_img_s']:.1f} | {r['model_only_img_s']:.1f} | {ref} | "
          f"{r['e2e_over_model_only']:.3f}x | {r['mfu_e2e']:.1%} | {st['read']:.2f} / {st['decode']:.2f} / {st['fit']:.2f} | "
          f"{st['preprocess']:.2f} / {st['forward']:.2f} | {st['write']:.2f} | {wt['decode']:.2f} / {wt['write']:.2f} | {peak} |")
print(f"\n| decode + fit, {dc['images']} JPEGs {hw[1]}x{hw[0]} to {p2.side} | ms/image |\n|---|---|")
print(f"| Pillow, one thread | {dc['pil_ms_per_image']:.2f} |\n| torch on {dc['device']}, one batch | {dc['torch_ms_per_image']:.2f} |")
print(f"| header probe in the worker | {dc['probe_ms_per_image']:.2f} |")
print(f"\ntorch vs Pillow pixels: max abs diff {dc['max_abs_diff']}, {dc['frac_differing']:.4%} of values differ "
      f"({dc['compared']} compared, {dc['fallback']} fell back to Pillow)")
mb = rows[0][1]["memory_batch"]
print(f"\n| peak memory of one forward, batch of {mb} ({rows[0][1]['memory_tool']}) | GiB | vs single scale |\n|---|---|---|")
for n, v in mem.items():
    print(f"| {n} | {v['peak'] / gib:.2f} | {v['vs_single_scale']:.2f}x |")
sys.exit(0 if all(ok for _, _, ok in checks) else 1)
