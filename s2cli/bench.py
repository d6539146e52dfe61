"""Bench: one extraction timed end to end against the bare engine on the same decoded images, with FLOPs counted
by torch, MFU against a matmul ceiling measured on the device, the stage split of the run, peak memory, and the
reference's per-scale forward timed and measured beside ours."""
from __future__ import annotations

import dataclasses
import io
import math
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from . import api
from .backbones import Backbone
from .config import Resolved
from .errors import ConfigError, S2Error
from .extractor import Extractor, use_channels_last
from .inputs.decode import Decoded, Fit, decode_sample
from .inputs.loader import decode_nice
from .inputs.samples import Sample
from .inputs.units import Input, Unit
from .launch import resolve_device, resolve_precision
from .plan import fit_of, plan_entry
from .strategies import strategy_of
from .tiling import multiscale_forward, plan_multiscale, resize_image


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


def reference_forward(model: Callable[[torch.Tensor], torch.Tensor], input: torch.Tensor, scales=None, img_sizes=None,
                      max_split_size: int | None = None, resize_output_to_idx: int = 0, num_prefix_token: int = 0,
                      output_shape: str = "bnc", split_forward: bool = False) -> torch.Tensor:
    """The reference s2wrapper `forward` (master branch: square images, resize mode), step for step as it runs, to
    time and measure it beside `multiscale_forward` (which gives the same numbers): every scale's image is resized
    (also to its own size) and cut into tiles (a cat of slices) before any backbone call; the backbone runs once
    per scale (in calls of B images with `split_forward`); every output is kept; each scale's tiles are stitched
    (row cats, then a column cat), area-resized to the chosen scale's grid (also at its own size) and
    concatenated; prefix tokens are stacked per tile and averaged."""
    b, _, side, side_w = input.shape
    if side != side_w:
        raise S2Error("the reference forward (master branch) takes square images only", given=tuple(input.shape[-2:]),
                      expected="H == W", fix="use multiscale_forward for non-square images")
    sizes = list(img_sizes) if img_sizes is not None else [int(side * s) for s in scales]
    split = max_split_size or side
    splits = [math.ceil(size / split) for size in sizes]
    tiles = []
    for size, n in zip(sizes, splits):
        x = F.interpolate(input.to(torch.float32), size=size, mode="bicubic").to(input.dtype)
        t = size // n
        tiles.append(torch.cat([x[:, :, i * t:(i + 1) * t, j * t:(j + 1) * t] for i in range(n) for j in range(n)], dim=0))
    outs = [torch.cat([model(p) for p in x.split(b)], dim=0) if split_forward else model(x) for x in tiles]
    prefixes = [o[:, :num_prefix_token] for o in outs] if num_prefix_token else []
    maps = []
    for o, n in zip(outs, splits):
        if output_shape == "bnc":
            o = o[:, num_prefix_token:]
            g = int(o.shape[1] ** 0.5)
            o = o.transpose(1, 2).reshape(o.shape[0], o.shape[2], g, g)
        maps.append(torch.cat([torch.cat([o[(i * n + j) * b:(i * n + j + 1) * b] for j in range(n)], dim=-1)
                               for i in range(n)], dim=-2))
    size = maps[resize_output_to_idx].shape[-2]
    out = torch.cat([F.interpolate(m.to(torch.float32), size=size, mode="area").to(m.dtype) for m in maps], dim=1)
    if output_shape == "bnc":
        out = out.flatten(2).transpose(1, 2)
    if prefixes:
        pre = torch.cat([torch.stack(p.split(b, dim=0), dim=0).mean(dim=0) for p in prefixes], dim=-1)
        out = torch.cat([pre, out], dim=1)
    return out


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages that ops create while it is active, and frees them when they die:
    `peak` is the most bytes alive at once, at op granularity (an op's own scratch space is not seen; nor is the
    CPU allocator's rounding or caching). Views and in-place results are not new memory and are not counted.
    Storages made before it started (weights, the input) are left out: pass them as `held` to count them in
    `held_bytes`. The CPU stand-in for torch.cuda.max_memory_allocated (which `peak_memory` uses on CUDA)."""

    def __init__(self, held: Any = ()):
        super().__init__()
        self.live: dict[int, tuple[Any, int]] = {}
        self.held: dict[int, Any] = {}
        for t in held:
            st = t.untyped_storage()
            self.held[st._cdata] = st  # kept alive, so the key stays theirs
        self.held_bytes = sum(st.nbytes() for st in self.held.values())
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for k in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(k)[1]
        if not func.is_view and not any(r.alias_info is not None for r in func._schema.returns):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                    st = t.untyped_storage()
                    if st._cdata not in self.live and st._cdata not in self.held:
                        self.live[st._cdata] = (StorageWeakRef(st), st.nbytes())
                        self.current += st.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def peak_memory(fn: Callable[[], Any], held: Any = (), device: torch.device | None = None) -> dict[str, int]:
    """Run `fn()` once and return {"held": bytes of the `held` tensors (weights, input), "working": the most bytes
    of tensors made by the call alive at once (its result included), "peak": held + working}. On CUDA from the
    caching allocator's statistics (`max_memory_allocated` over what was allocated at entry), elsewhere by
    `LiveTensorBytes`."""
    held = list(held)
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        working = torch.cuda.max_memory_allocated(device) - base
        del result
        held_bytes = sum({t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in held}.values())
    else:
        with LiveTensorBytes(held) as mode:
            result = fn()
        del result
        working, held_bytes = mode.peak, mode.held_bytes
    return {"held": held_bytes, "working": working, "peak": held_bytes + working}


def _reference_applies(x: torch.Tensor, kw: dict[str, Any]) -> bool:
    """The reference master branch (what `reference_forward` runs) covers square images in resize mode."""
    plan = plan_multiscale(tuple(x.shape[-2:]), img_sizes=kw["img_sizes"], max_split_size=kw["max_split_size"],
                           split_mode=kw["split_mode"])
    return plan.branch == "square" and not kw["antialias"]


def _reference_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if k not in ("split_mode", "antialias")}


def _engine(res: Resolved, ex: Extractor, model: Callable[[torch.Tensor], torch.Tensor],
            reference: bool = False) -> Callable[[list[Decoded]], Any]:
    """The bare batched engine over decoded records: normalize on the device and `multiscale_forward` (for a
    dynamic-resolution strategy, the Extractor's grouped strategy call), nothing copied back. `reference=True`
    runs `reference_forward` (the reference's per-scale loop) instead."""
    strategy = strategy_of(res)
    if strategy.engine_kwargs(res, strategy.plan(res, (res.side, res.side))) is None:  # its own grouped call
        return ex.strategy_features

    @torch.inference_mode()
    def call(recs: list[Decoded]) -> torch.Tensor:
        x = _normalized(ex, recs)
        kw = strategy.engine_kwargs(res, recs[0].plan)
        if reference:
            return reference_forward(model, x, **_reference_kwargs(kw))
        return multiscale_forward(model, x, **kw, max_batch=res.max_tiles_per_call)
    return call


def _normalized(ex: Extractor, recs: list[Decoded]) -> torch.Tensor:
    return ex.normalize(torch.stack([r.pixels for r in recs]).to(ex.device))


def memory_figures(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, weights: Any = (),
                   device: torch.device | None = None, **kw: Any) -> dict[str, dict[str, Any]]:
    """Peak memory of one forward over the batch `x` (normalized, at the largest scale's fit), each variant run
    once by `peak_memory`: the single-scale forward (the model on `x` resized to its input size; `x` itself is
    not held), our S² in one call and chunked (`max_batch` = the batch size), and, where the reference master
    branch applies, the reference's forward and its `split_forward`. `kw` are `multiscale_forward`'s arguments.
    Each figure gets `vs_single_scale`: its peak over the single-scale forward's."""
    b, side = x.shape[0], kw.get("max_split_size") or x.shape[-1]
    x1 = resize_image(x, (side, side))
    variants: dict[str, tuple[Callable[[], Any], torch.Tensor]] = {
        "single_scale": (lambda: model(x1), x1),
        "s2": (lambda: multiscale_forward(model, x, **kw), x),
        "s2_chunked": (lambda: multiscale_forward(model, x, **kw, max_batch=b), x),
    }
    if _reference_applies(x, kw):
        rk = _reference_kwargs(kw)
        variants["reference"] = (lambda: reference_forward(model, x, **rk), x)
        variants["reference_split_forward"] = (lambda: reference_forward(model, x, **rk, split_forward=True), x)
    out: dict[str, dict[str, Any]] = {}
    with torch.inference_mode():
        for name, (fn, inp) in variants.items():
            out[name] = peak_memory(fn, held=[*weights, inp], device=device)
    base = out["single_scale"]["peak"]
    for v in out.values():
        v["vs_single_scale"] = round(v["peak"] / base, 3)
    return out


def _batches(recs: list[Decoded], size: int) -> list[list[Decoded]]:
    """Batches of `size` in order, split further by image shape (as the run's flush groups them)."""
    out = []
    for i in range(0, len(recs), size):
        groups: dict[tuple, list] = {}
        for r in recs[i:i + size]:
            groups.setdefault(tuple(r.pixels.shape) if isinstance(r.pixels, torch.Tensor) else tuple(r.orig_hw), []).append(r)
        out += list(groups.values())
    return out


def _timed(engine: Callable[[list[Decoded]], Any], batches: list, device: torch.device) -> float:
    """Seconds for `engine` over every batch, after one warm-up batch (excluded)."""
    engine(batches[0])
    _sync(device)
    t = time.perf_counter()
    for b in batches:
        engine(b)
    _sync(device)
    return time.perf_counter() - t


def bench(input: str | None = None, images: int = 64, image_hw: tuple[int, int] = (768, 1024),
          recipe: str | None = None, **options: Any) -> dict[str, Any]:
    """`s2 bench`: time `s2cli.extract` on `images` of `input` (a folder or list), or on synthetic JPEGs of
    `image_hw` made in memory, against the bare engine (`measure`). `options` are `s2cli.extract`'s."""
    if images < 1:
        raise ConfigError("--images must be at least 1", given=images, fix="pass e.g. --images 64")
    spec = input or f"synthetic:{images}x{image_hw[1]}x{image_hw[0]}"
    res = api.settings(spec, "bench.h5", recipe=recipe, limit=images if input else None, **options)
    if input is None:
        samples = synthetic_jpegs(images, image_hw, seed=res.seed)
    else:
        samples = [s for unit in api.open_inputs(res).units for s in unit.samples() if isinstance(s, Sample)][:images]
    resolve_device(res.device)
    return measure(res, samples, api.load(res), spec)


def measure(res: Resolved, samples: list[Sample], backbone: Backbone, spec: str) -> dict[str, Any]:
    """Time `s2cli.extract` end to end over `samples` (after a warm-up batch, excluded) and the bare engine over
    the same decoded images; count FLOPs of one image; measure the matmul ceiling; report stages and peak memory."""
    device = resolve_device(res.device)
    dtype = resolve_precision(res.precision, device)
    if not samples:
        raise S2Error("nothing to benchmark", given=spec, expected="at least one image", fix="pass --images N or a folder of images")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warm = samples[:res.batch_size]
    with tempfile.TemporaryDirectory(prefix="s2bench-") as tmp:
        res = dataclasses.replace(res, output=str(Path(tmp) / Path(res.output).name))
        w = api.extract(memory_input(warm, spec), config=res, overwrite=True, backbone=backbone)
        if w.num_failed:
            raise S2Error(f"the warm-up batch failed: {w.num_failed} of {len(warm)} images",
                          given=spec, fix="run `s2 extract` on the input to read the failure records")
        summary = api.extract(memory_input(samples, spec), config=res, overwrite=True, backbone=backbone)
    if summary["num_failed"]:
        raise S2Error(f"{summary['num_failed']} of {len(samples)} images failed in the timed run", given=spec,
                      fix="run `s2 extract` on the input to read the failure records")

    # the bare engine over the same decoded images (decoded here, in this process, before the clock starts)
    recs = [decode_sample(s, dataclasses.replace(fit_of(res), decode="pil")) for s in samples]  # the bare engine: Pillow
    for r in recs:
        r.map_arrays(torch.from_numpy)
    ex = Extractor(res, backbone, device, dtype)
    engine = _engine(res, ex, backbone)
    batches = _batches(recs, res.batch_size)
    ref_kw = strategy_of(res).engine_kwargs(res, recs[0].plan)
    with_reference = ref_kw is not None and _reference_applies(_normalized(ex, recs[:1]), ref_kw)
    with torch.inference_mode():
        model_s = _timed(engine, batches, device)
        reference_s = _timed(_engine(res, ex, backbone, reference=True), batches, device) if with_reference else None
        with flop_counter() as fc:  # on the eager forward: the counter sees every op
            _engine(res, ex, backbone.eager_forward)(recs[:1])
        flops = float(fc.get_total_flops())
        memory = None
        if ref_kw is not None:  # S²: the first batch
            first = batches[0]  # one image shape (batches are grouped by shape)
            weights = [*backbone.module.parameters(), *backbone.module.buffers()]
            memory = memory_figures(backbone.eager_forward, _normalized(ex, first), weights, device, **ref_kw)
    _, formula = plan_entry(res, recs[0].orig_hw)  # type: ignore[arg-type]
    ceiling = matmul_ceiling(device)
    n = summary["num_images"]
    e2e_ips, model_ips = n / summary["seconds"], n / model_s
    kib = 1024
    return {
        "model": res.model, "weights": backbone.weights, "device": str(device), "precision": res.precision,
        "compile": res.compile, "compile_cache": summary.compile_cache, "decode": res.decode,
        "channels_last": use_channels_last(res), "input": spec, "images": n, "warmup_images": len(warm), "batch_size": res.batch_size,
        "workers": res.workers, "decode_nice": decode_nice() if res.workers else None,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "torch_threads": torch.get_num_threads(), "img_sizes": list(res.img_sizes),
        "e2e_seconds": summary["seconds"], "e2e_img_s": round(e2e_ips, 3),
        "model_only_seconds": round(model_s, 4), "model_only_img_s": round(model_ips, 3),
        "e2e_over_model_only": round(summary["seconds"] / model_s, 3),
        "flops_per_image": flops, "flops_per_image_formula": formula,
        "matmul_ceiling_flops_per_s": ceiling["flops_per_s"], "matmul": f"{ceiling['n']}^3 {ceiling['dtype']}",
        "mfu_e2e": flops * e2e_ips / ceiling["flops_per_s"], "mfu_model_only": flops * model_ips / ceiling["flops_per_s"],
        "reference_seconds": None if reference_s is None else round(reference_s, 4),
        "reference_img_s": None if reference_s is None else round(n / reference_s, 3),
        "model_only_vs_reference": None if reference_s is None else round(reference_s / model_s, 3),  # speed ratio
        "memory": memory, "memory_batch": None if memory is None else len(first),
        "memory_tool": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "LiveTensorBytes",
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

    pil_fit = Fit(fit.mode, fit.side, fit.mean, crop_round=fit.crop_round)
    dev_fit = dataclasses.replace(pil_fit, decode="torch")
    t = time.perf_counter()
    pil = [decode_sample(s, pil_fit) for s in samples]
    pil_s = time.perf_counter() - t
    decode_batch([decode_sample(s, dev_fit) for s in samples[:2]], dev_fit, device)  # warm-up (nvJPEG handles)
    t = time.perf_counter()
    raw = [decode_sample(s, dev_fit) for s in samples]
    probe_s = time.perf_counter() - t
    on_device = [i for i, r in enumerate(raw) if r.jpeg is not None]
    _sync(device)
    t = time.perf_counter()
    decode_batch([raw[i] for i in on_device], dev_fit, device)
    _sync(device)
    dev_s = time.perf_counter() - t
    # compared: images the device decoded (not those it handed back to Pillow) that Pillow decoded too
    same = [i for i in on_device if "pil-fallback" not in (raw[i].meta or "") and pil[i].error is None]
    diffs = [(torch.from_numpy(pil[i].pixels).to(torch.int16) - raw[i].pixels.cpu().to(torch.int16)).abs().flatten()
             for i in same]
    d = torch.cat(diffs) if diffs else torch.zeros(0, dtype=torch.int16)
    n = len(samples)
    return {"device": str(device), "images": n, "fallback": n - len(same), "compared": len(same),
            "pil_ms_per_image": 1e3 * pil_s / n, "torch_ms_per_image": 1e3 * dev_s / max(1, len(on_device)),
            "probe_ms_per_image": 1e3 * probe_s / n,
            "max_abs_diff": int(d.max()) if d.numel() else None,
            "frac_differing": float((d != 0).float().mean()) if d.numel() else None,
            "mean_abs_diff": float(d.float().mean()) if d.numel() else None}
