"""Extractor: the backbone on its device. Normalizes fitted uint8 images there, runs the S² engine (all tiles of
all scales in as few backbone calls as allowed) or a strategy's grouped calls and merge, pools, and hands the
features back on the host in the storage dtype; a failed call is retried image by image, non-finite features
are recorded instead of stored."""
from __future__ import annotations

import time
from typing import Any, Callable

import torch

from .backbones import Backbone
from .config import Resolved
from .errors import ConfigError
from .inputs.decode import Decoded, Fit
from .inputs.samples import Sample, failure
from .strategies import ImagePlan, cut_view, grouped_calls, merge as merge_views, outputs_to_maps
from .tiling import multiscale_forward

# (rec, features, pooled) for one image, features and pooled on the host (or None)
Result = tuple[Decoded, Any, Any]


def use_channels_last(res: Resolved) -> bool:
    """--channels-last, or by default on for ConvNets (bchw backbones), on CUDA and on the CPU alike
    (benchmarks/cpu_extract.py compares both), off for ViTs."""
    if res.channels_last is not None:
        return res.channels_last
    return res.backbone.output_shape == "bchw"


def normalize_images(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 (3, H, W) or (B, 3, H, W) -> (x / 255 - mean) / std in `dtype` (mean, std shaped (3, 1, 1)). One
    float copy, then in place (out of place held three float copies of the batch at its largest scale at once);
    the same operations in the same order, so the same values."""
    x = images.to(torch.float32, copy=True).div_(255)  # a copy even if given floats: never the caller's tensor
    x.sub_(mean).div_(std)
    return x.to(dtype)


def finite_sums(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Per image of a batch, the sum of each (B, ...) tensor in float32, on its device: one reduction per tensor
    for the whole batch (on CUDA, queued with the batch's other work). A non-finite element makes its image's sum
    non-finite; a finite sum proves the image finite, and a non-finite one (finite float32 values can overflow it)
    only says to look closer (`Extractor.finite`)."""
    return [None if t is None else t.reshape(t.shape[0], -1).sum(dim=1, dtype=torch.float32) for t in tensors]


def all_finite(t: torch.Tensor, total: torch.Tensor | None = None) -> bool:
    """Whether `t` holds no NaN or Inf: its sum (`total`, or computed here: one pass, no mask) when finite, else
    element by element."""
    total = t.sum(dtype=torch.float32) if total is None else total
    return bool(torch.isfinite(total)) or bool(torch.isfinite(t).all())


def _pool(tokens: torch.Tensor, pool: str, prefix: int, dim: int) -> torch.Tensor | None:
    """--pool mean (over the spatial tokens) | cls (the first token) | none, over tokens laid out on `dim`."""
    if pool == "mean":
        return tokens.narrow(dim, prefix, tokens.shape[dim] - prefix).float().mean(dim=dim)
    if pool == "cls":
        return tokens.select(dim, 0)
    return None


def split_layers(out: torch.Tensor, n: int, channels: int) -> torch.Tensor:
    """The engine's output with --layers, (B, T, S*L*C) (each scale's channel slot holds the L layers side by side,
    as the backbone returned them) -> (B, L, T, S*C): each layer as a run of --layer alone gives it."""
    B, T, W = out.shape
    return out.view(B, T, W // (n * channels), n, channels).permute(0, 3, 1, 2, 4).reshape(B, n, T, -1)


def scale_embeddings(emb: torch.Tensor, tiles: list[int], b: int) -> torch.Tensor:
    """--pool embed: (B, (1 + S) * D) = [combined | scale 1 | ... | scale S] from the model's embeddings of every
    tile of one engine call (scale by scale, tile-major, batch-minor, as the engine runs them). A scale's embedding
    is the mean of its tiles' (at one tile, the model's own image embedding); the combined one is the mean of the
    L2-normalized scale embeddings, L2-normalized."""
    per, off = [], 0
    for t in tiles:
        per.append(emb[off:off + t * b].float().view(t, b, -1).mean(0))
        off += t * b
    if off != emb.shape[0]:
        raise RuntimeError(f"{emb.shape[0]} tile embeddings for {off} tiles")
    unit = torch.stack([torch.nn.functional.normalize(e, dim=-1) for e in per])
    return torch.cat([torch.nn.functional.normalize(unit.mean(0), dim=-1), *per], dim=-1)


class Extractor:
    """Holds the loaded backbone on its device; `submit(images, plan)` starts the engine on fitted uint8 images of
    one plan (the copies to and from the device do not block on CUDA), `features(images, plan)` waits for the
    result. Each image's plan comes in its decoded record, made once by the decode worker: nothing here plans."""

    def __init__(self, res: Resolved, backbone: Backbone, device: torch.device, dtype: torch.dtype, fit: Fit | None = None):
        from .devicepath import Transfer

        self.res, self.backbone, self.device, self.dtype, self.fit = res, backbone, device, dtype, fit
        bb = res.backbone
        self.mean = torch.tensor(bb.mean, device=device).view(3, 1, 1)  # broadcasts over (3, H, W) and (B, 3, H, W)
        self.std = torch.tensor(bb.std, device=device).view(3, 1, 1)
        self.out_dtype = torch.float16 if res.dtype == "float16" else torch.float32
        # stage timing, host seconds: normalize on the device; engine + copy back (+ waiting for it on CUDA)
        self.seconds = {"preprocess": 0.0, "forward": 0.0, "check": 0.0}  # check: the host's finite verdicts
        self.decode_seconds = {"decode": 0.0, "fit": 0.0}  # --decode torch, on the device
        self.transfer = Transfer(device)
        backbone.to(device, dtype)
        if use_channels_last(res):
            backbone.channels_last()
        if res.compile:
            backbone.compile()

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return normalize_images(images, self.mean, self.std, self.dtype)

    def _waited(self, s: float) -> None:
        self.seconds["forward"] += s

    @torch.inference_mode()
    def submit(self, images: torch.Tensor | list[torch.Tensor], plan: ImagePlan) -> Any:
        """uint8 (B, 3, H, W) or a list of (3, H, W) of images of one `plan` (their fitted size: `plan.fitted_hw`),
        on the host or the device -> a `devicepath.Pending` whose
        result() is (features (B, T, C) or None with --pool-only, pooled (B, C) or None), on the CPU in the
        storage dtype. On CUDA the batch goes up through pinned memory on a side stream and comes back into pinned
        buffers, so this returns while the GPU computes."""
        res, bb = self.res, self.res.backbone
        t0 = time.perf_counter()
        x = self.normalize(self.transfer.to_device(images))
        t1 = time.perf_counter()
        if self.backbone.embeddings is not None:
            self.backbone.embeddings.clear()  # what a failed call left
        out = multiscale_forward(
            self.backbone, x, img_sizes=plan.engine_sizes, max_split_size=res.max_split_size,
            split_mode=res.split_mode, resize_output_to_idx=res.resize_output_to_idx,
            num_prefix_token=bb.num_prefix_tokens, output_shape=bb.output_shape, antialias=res.antialias,
            max_batch=res.max_tiles_per_call, plan=plan.s2)
        if bb.output_shape == "bchw":
            out = out.flatten(2).transpose(1, 2)
        if res.layers is not None:
            out = split_layers(out, len(res.layers), bb.channels)
        if res.pool == "embed":
            pooled = scale_embeddings(self.backbone.take_embeddings(), [s.num_tiles for s in plan.s2.scales], x.shape[0])
        else:
            pooled = _pool(out, res.pool, bb.num_prefix_tokens, dim=out.dim() - 2)
        pooled = None if pooled is None else pooled.to(self.out_dtype)
        feats = None if res.pool_only else out.to(self.out_dtype)
        sums = finite_sums(feats, pooled) if res.check_finite else [None, None]
        pending = self.transfer.to_host(feats, pooled, on_wait=self._waited, aside=tuple(sums))
        self.seconds["preprocess"] += t1 - t0
        self.seconds["forward"] += time.perf_counter() - t1
        return pending

    def features(self, images: torch.Tensor | list[torch.Tensor], plan: ImagePlan) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """`submit` and wait: (features, pooled) on the CPU."""
        return self.submit(images, plan).result()

    def submit_s2(self, recs: list[Decoded], on_fail: Callable[[dict], None]) -> list[Callable[[], list[Result]]]:
        """The S² engine on a batch: JPEG bytes (--decode torch) decoded and fitted on the device first, then one
        engine call per image shape (images of one fitted shape share their plan's sizes and tiles). Returns, per
        call, what waits for it and gives its results."""
        if any(r.jpeg is not None for r in recs):
            recs = self._device_decode(recs, on_fail)
        groups: dict[tuple[int, ...], list[Decoded]] = {}
        for rec in recs:
            groups.setdefault(tuple(rec.pixels.shape), []).append(rec)
        return [self._submit_group(g, g[0].plan, on_fail) for g in groups.values()]

    def _device_decode(self, recs: list[Decoded], on_fail: Callable[[dict], None]) -> list[Decoded]:
        from .devicepath import decode_batch

        decode_batch([r for r in recs if r.jpeg is not None], self.fit, self.device, timing=self.decode_seconds)
        for r in recs:
            if r.error is not None:
                on_fail(r.error)
        return [r for r in recs if r.error is None]

    def _submit_group(self, recs: list[Decoded], plan: ImagePlan,
                      on_fail: Callable[[dict], None]) -> Callable[[], list[Result]]:
        """Start the engine on images of one shape (one call; on CUDA it returns while the GPU works) and return
        what waits for it. If the call fails, each image is retried alone (`with_retry`)."""
        def compute(rs: list[Decoded]) -> list[tuple[Any, Any]]:
            feats, pooled = self.features([r.pixels for r in rs], plan)
            return [(None if feats is None else feats[i], None if pooled is None else pooled[i]) for i in range(len(rs))]

        try:
            pending = self.submit([r.pixels for r in recs], plan)
        except ConfigError:
            raise
        except Exception as e:
            done = self.with_retry(compute, recs, on_fail, failed=e)
            return lambda: done

        def resolve() -> list[Result]:
            try:
                feats, pooled = pending.result()
                sums = (*pending.aside(), None, None)[:2]  # (None: a Pending made without them)
            except ConfigError:
                raise
            except Exception as e:
                return self.with_retry(compute, recs, on_fail, failed=e)
            return self.finite([(r, None if feats is None else feats[i], None if pooled is None else pooled[i])
                                for i, r in enumerate(recs)], on_fail, sums=sums)
        return resolve

    @torch.inference_mode()
    def strategy_features(self, recs: list[Decoded]) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """A dynamic-resolution strategy over images whose views were rendered by the decode workers: the inputs
        of every view of every image go through the backbone together (one call per input size, capped by
        --max-tiles-per-call), then each image's features are merged. Returns (features (T, C), pooled (C,))."""
        res, bb = self.res, self.res.backbone
        t0 = time.perf_counter()
        plans = [(r.plan.views, r.plan.layout) for r in recs]  # each image's, made by its decode worker
        inputs = []
        for (plan, _), r in zip(plans, recs):
            pix = [self.normalize(a.to(self.device)) for a in r.pixels]
            inputs += [cut_view(pix[0 if plan.same_source else i], v) for i, v in enumerate(plan.views)]
        t1 = time.perf_counter()
        outs = iter(grouped_calls(self.backbone, inputs, res.max_tiles_per_call))
        results = []
        C, n = bb.channels, len(res.layers or [None])
        for plan, lay in plans:
            views = [next(outs) for _ in plan.views]  # with --layers: the layers side by side on the last axis
            per_layer = []
            for k in range(n):
                per_view = [outputs_to_maps(o if res.layers is None else o[..., k * C:(k + 1) * C], bb.num_prefix_tokens,
                                            bb.output_shape, bb.feature_hw(v.tile)) for o, v in zip(views, plan.views)]
                per_layer.append(merge_views(res.strategy_cfg, plan, per_view, lay))
            tokens = per_layer[0] if res.layers is None else torch.stack(per_layer)  # (T, C') or (L, T, C')
            pooled = _pool(tokens, res.pool, lay.prefix, dim=tokens.dim() - 2)
            results.append((None if res.pool_only else tokens.to(self.out_dtype).cpu(),
                            None if pooled is None else pooled.to(self.out_dtype).cpu()))
        self.seconds["preprocess"] += t1 - t0
        self.seconds["forward"] += time.perf_counter() - t1
        return results

    def with_retry(self, compute: Callable[[list[Decoded]], list[tuple[Any, Any]]], recs: list[Decoded],
                   on_fail: Callable[[dict], None], failed: Exception | None = None) -> list[Result]:
        """(rec, features, pooled) for images computed together. If that call fails (or already `failed`), each
        image is retried alone so only the image that fails is recorded (stage "model"); a configuration error
        stops the run."""
        if failed is None:
            try:
                return self.finite([(r, f, p) for r, (f, p) in zip(recs, compute(recs))], on_fail)
            except ConfigError:
                raise
            except Exception as e:
                failed = e
        if len(recs) == 1:
            on_fail(failure(Sample(recs[0].key, recs[0].source), "model", failed))
            return []
        out = []
        for r in recs:
            try:
                out.append((r, *compute([r])[0]))
            except ConfigError:
                raise
            except Exception as e:
                on_fail(failure(Sample(r.key, r.source), "model", e))
        return self.finite(out, on_fail)

    def finite(self, results: list[Result], on_fail: Callable[[dict], None],
               sums: tuple[torch.Tensor | None, ...] = (None, None)) -> list[Result]:
        """With --check-finite (the default), an image whose stored features or pooled vector hold NaN or Inf (an
        fp16 overflow, a broken checkpoint) is recorded (stage "model", NonFiniteFeatures) instead of written.
        `sums`: the batch's per-image sums from `finite_sums`, made on the device with the features; an image is
        looked at element by element only when its sum is not finite."""
        res = self.res
        if not res.check_finite:
            return results
        t0 = time.perf_counter()
        kept = []
        for i, (r, f, p) in enumerate(results):
            bad = [(name, t) for name, t, s in (("features", f, sums[0]), ("pooled", p, sums[1]))
                   if t is not None and not all_finite(t, None if s is None else s[i])]
            if not bad:
                kept.append((r, f, p))
                continue
            name, t = bad[0]
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            hint = ("the float16 storage overflowed: use --dtype float32" if res.dtype == "float16" and f is not None
                    else "try --precision fp32" if res.precision != "fp32" else "check the weights")
            on_fail(failure(Sample(r.key, r.source), "model",
                            f"{name} hold {nan} NaN and {inf} Inf values of {t.numel()}; {hint} "
                            "(--no-check-finite stores them anyway)", "NonFiniteFeatures"))
        self.seconds["check"] += time.perf_counter() - t0
        return kept
