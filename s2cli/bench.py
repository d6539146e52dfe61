"""Bench: one extraction timed end to end against the bare engine on the same decoded images, with FLOPs counted
by torch, MFU against a matmul ceiling measured on the device, the stage split of the run, and peak memory."""
from __future__ import annotations

import dataclasses
import io
import resource
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from .backbones import Backbone
from .config import Resolved
from .errors import S2Error
from .launch import resolve_device, resolve_precision
from .pipeline import Extractor, Target, _dry_entry, plan_image, run, use_channels_last
from .sources import Fit, Input, Sample, Unit, decode_sample
from .tiling import multiscale_forward


def synthetic_jpegs(n: int, hw: tuple[int, int] = (768, 1024), seed: int = 0, quality: int = 90) -> list[Sample]:
    """`n` photo-like JPEGs made in memory (smooth color fields plus grain, so they compress and decode like
    photos, not like noise), the same bytes for the same seed."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((hw[1], hw[0]), Image.BICUBIC)
        arr = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (hw[0], hw[1], 3), dtype=np.int16)
        buf = io.BytesIO()
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
        out.append(Sample(f"synthetic-{i:05d}", f"<memory>#{i}", data=buf.getvalue()))
    return out


def memory_input(samples: list[Sample], spec: str) -> Input:
    return Input("memory", spec, [Unit(0, spec, list(samples))], len(samples))


def matmul_ceiling(device: torch.device) -> dict[str, Any]:
    """FLOP/s of the best of a few large square matmuls: fp32 n=2048 on the CPU, bf16 n=8192 on CUDA."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(4):
        _sync(device)
        t = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        times.append(time.perf_counter() - t)
    best = min(times[1:])  # the first call is a warm-up
    return {"flops_per_s": 2 * n ** 3 / best, "n": n, "dtype": str(dtype).replace("torch.", "")}


def flop_counter():
    """torch's FlopCounterMode, also counting the CPU's fused attention kernel (torch has no formula for
    `_scaled_dot_product_flash_attention_for_cpu`, so a ViT's attention would count as zero on the CPU)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_sdpa(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    return FlopCounterMode(display=False,
                           custom_mapping={torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _engine(res: Resolved, ex: Extractor, model: Callable[[torch.Tensor], torch.Tensor],
            fuse: bool = True) -> Callable[[list[dict[str, Any]]], Any]:
    """The bare batched engine over decoded records: normalize on the device and `multiscale_forward` (for a
    dynamic-resolution strategy, the Extractor's grouped strategy call), nothing copied back. fuse=False is the
    reference's per-scale loop (one backbone call per scale) on the same model."""
    u, bb = res.user, res.backbone
    if res.strategy is not None:
        return ex.strategy_features

    @torch.inference_mode()
    def call(recs: list[dict[str, Any]]) -> torch.Tensor:
        x = torch.stack([r["image"] for r in recs]).to(ex.device).float().div_(255)
        x = ((x - ex.mean) / ex.std).to(ex.dtype)
        return multiscale_forward(
            model, x, img_sizes=plan_image(res, tuple(recs[0]["orig_hw"])).engine_sizes,
            max_split_size=res.max_split_size, split_mode=u.split_mode, resize_output_to_idx=u.resize_output_to_idx,
            num_prefix_token=bb.num_prefix_tokens, output_shape=bb.output_shape, antialias=u.antialias,
            max_batch=u.max_tiles_per_call, fuse=fuse)
    return call


def _batches(recs: list[dict[str, Any]], size: int) -> list[list[dict[str, Any]]]:
    """Batches of `size` in order, split further by image shape (as the pipeline's flush groups them)."""
    out = []
    for i in range(0, len(recs), size):
        groups: dict[tuple, list] = {}
        for r in recs[i:i + size]:
            groups.setdefault(tuple(r["image"].shape) if isinstance(r["image"], torch.Tensor) else tuple(r["orig_hw"]), []).append(r)
        out += list(groups.values())
    return out


def bench(res: Resolved, samples: list[Sample], backbone: Backbone, spec: str, reference: bool = False) -> dict[str, Any]:
    """Time `run` end to end over `samples` (after a warm-up batch, excluded) and the bare engine over the same
    decoded images; count FLOPs of one image; measure the matmul ceiling; report stages and peak memory. With
    `reference`, also time the reference's per-scale loop on the same model and images (S² only)."""
    u = res.user
    device = resolve_device(u.device)
    dtype = resolve_precision(u.precision, device)
    if not samples:
        raise S2Error("nothing to benchmark", given=spec, expected="at least one image", fix="pass --images N or a folder of images")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warm = samples[:u.batch_size]
    with tempfile.TemporaryDirectory(prefix="s2bench-") as tmp:
        out = str(Path(tmp) / Path(res.output).name)
        res = dataclasses.replace(res, output=out)
        w = run(res, memory_input(warm, spec), Target(res, memory_input(warm, spec), overwrite=True), backbone)
        if w["num_failed"]:
            raise S2Error(f"the warm-up batch failed: {w['num_failed']} of {len(warm)} images",
                          given=spec, fix="run `s2 extract` on the input to read the failure records")
        inp = memory_input(samples, spec)
        summary = run(res, inp, Target(res, inp, overwrite=True), backbone)
    if summary["num_failed"]:
        raise S2Error(f"{summary['num_failed']} of {len(samples)} images failed in the timed run", given=spec,
                      fix="run `s2 extract` on the input to read the failure records")

    # the bare engine over the same decoded images (decoded here, in this process, before the clock starts)
    fit = Fit(res.fit, res.side, res.backbone.mean, res.strategy)
    recs = [decode_sample(s, fit) for s in samples]
    for r in recs:
        r["image"] = [torch.from_numpy(a) for a in r["image"]] if isinstance(r["image"], list) else torch.from_numpy(r["image"])
    ex = Extractor(res, backbone, device, dtype)
    engine = _engine(res, ex, backbone)
    batches = _batches(recs, u.batch_size)
    with torch.inference_mode():
        engine(batches[0])  # warm-up, excluded
        _sync(device)
        t = time.perf_counter()
        for b in batches:
            engine(b)
        _sync(device)
        model_s = time.perf_counter() - t
        reference_s = None
        if reference and res.strategy is None:
            loop = _engine(res, ex, backbone, fuse=False)
            loop(batches[0])  # warm-up, excluded
            _sync(device)
            t = time.perf_counter()
            for b in batches:
                loop(b)
            _sync(device)
            reference_s = time.perf_counter() - t
        with flop_counter() as fc:  # on the eager forward: the counter sees every op
            _engine(res, ex, backbone.eager_forward)(recs[:1])
        flops = float(fc.get_total_flops())
    _, formula = _dry_entry(res, tuple(recs[0]["orig_hw"]))
    ceiling = matmul_ceiling(device)
    n = summary["num_images"]
    e2e_ips, model_ips = n / summary["seconds"], n / model_s
    kib = 1024
    return {
        "model": u.model, "weights": backbone.weights, "device": str(device), "precision": u.precision,
        "compile": u.compile, "decode": u.decode, "channels_last": use_channels_last(res), "input": spec, "images": n, "warmup_images": len(warm), "batch_size": u.batch_size,
        "workers": u.workers, "torch_threads": torch.get_num_threads(), "img_sizes": list(res.img_sizes),
        "e2e_seconds": summary["seconds"], "e2e_img_s": round(e2e_ips, 3),
        "model_only_seconds": round(model_s, 4), "model_only_img_s": round(model_ips, 3),
        "e2e_over_model_only": round(summary["seconds"] / model_s, 3),
        "reference_loop_seconds": None if reference_s is None else round(reference_s, 4),
        "reference_loop_img_s": None if reference_s is None else round(n / reference_s, 3),
        "flops_per_image": flops, "flops_per_image_formula": formula,
        "matmul_ceiling_flops_per_s": ceiling["flops_per_s"], "matmul": f"{ceiling['n']}^3 {ceiling['dtype']}",
        "mfu_e2e": flops * e2e_ips / ceiling["flops_per_s"], "mfu_model_only": flops * model_ips / ceiling["flops_per_s"],
        "stage_seconds": summary["stage_seconds"], "wait_seconds": summary["wait_seconds"],
        "peak_host_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib,
        "peak_host_children_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kib,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }


def decode_compare(samples: list[Sample], fit: Fit, device: torch.device) -> dict[str, Any]:
    """`--decode pil` vs `--decode torch` on the same JPEGs, in this process: ms per image of decode + fit on one
    thread with Pillow (from the bytes) and with `devicepath.decode_batch` on `device` (one batch; after a
    warm-up; the workers' read + header probe timed apart), and how far the torch pixels are from Pillow's: max
    abs uint8 difference, fraction of values differing, mean abs difference. Images that fell back to Pillow
    are counted, not compared."""
    from .devicepath import decode_batch

    pil_fit = Fit(fit.mode, fit.side, fit.mean)
    dev_fit = dataclasses.replace(pil_fit, decode="torch")
    t = time.perf_counter()
    pil = [decode_sample(s, pil_fit) for s in samples]
    pil_s = time.perf_counter() - t
    decode_batch([decode_sample(s, dev_fit) for s in samples[:2]], dev_fit, device)  # warm-up (nvJPEG handles)
    t = time.perf_counter()
    raw = [decode_sample(s, dev_fit) for s in samples]
    probe_s = time.perf_counter() - t
    on_device = [i for i, r in enumerate(raw) if "jpeg" in r]
    _sync(device)
    t = time.perf_counter()
    decode_batch([raw[i] for i in on_device], dev_fit, device)
    _sync(device)
    dev_s = time.perf_counter() - t
    # compared: images the device decoded (not those it handed back to Pillow) that Pillow decoded too
    same = [i for i in on_device if "pil-fallback" not in (raw[i]["meta"] or "") and pil[i]["error"] is None]
    diffs = [(torch.from_numpy(pil[i]["image"]).to(torch.int16) - raw[i]["image"].cpu().to(torch.int16)).abs().flatten()
             for i in same]
    d = torch.cat(diffs) if diffs else torch.zeros(0, dtype=torch.int16)
    n = len(samples)
    return {"device": str(device), "images": n, "fallback": n - len(same), "compared": len(same),
            "pil_ms_per_image": 1e3 * pil_s / n, "torch_ms_per_image": 1e3 * dev_s / max(1, len(on_device)),
            "probe_ms_per_image": 1e3 * probe_s / n,
            "max_abs_diff": int(d.max()) if d.numel() else None,
            "frac_differing": float((d != 0).float().mean()) if d.numel() else None,
            "mean_abs_diff": float(d.float().mean()) if d.numel() else None}
