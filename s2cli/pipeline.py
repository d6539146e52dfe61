"""Pipeline: one extraction end to end. Samples are decoded and fitted in DataLoader workers, normalized on the
device, run through the S² engine (all tiles of all scales in as few backbone calls as allowed), and handed
to the writer thread. Also the dry-run plan, computed from image headers and the backbone's config alone."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import __version__
from .backbones import Backbone
from .config import Resolved
from .errors import ConfigError
from .launch import resolve_device, resolve_precision
from .sinks import HDF5Sink
from .sources import ImageDataset, Sample, collate, failure, fit_size, image_size
from .tiling import S2Plan, multiscale_forward, plan_multiscale


@dataclass(frozen=True)
class ImagePlan:
    """What the engine does with one image: the fitted size, per-scale sizes, tiles, and the output grid."""

    fitted_hw: tuple[int, int]
    engine_sizes: list  # passed to multiscale_forward as img_sizes: ints (square) or (h, w) tuples
    s2: S2Plan
    grid_hw: tuple[int, int]
    tokens: int
    channels: int


def plan_image(res: Resolved, orig_hw: tuple[int, int]) -> ImagePlan:
    bb = res.backbone
    fitted = fit_size(orig_hw, res.fit, res.side)
    if fitted[0] == fitted[1]:
        sizes: list = list(res.img_sizes)
    else:
        sizes = [(fitted[0] * s // res.side, fitted[1] * s // res.side) for s in res.img_sizes]
    s2 = plan_multiscale(fitted, img_sizes=sizes, max_split_size=res.max_split_size, split_mode=res.user.split_mode)
    tile = s2.scales[res.user.resize_output_to_idx].tile
    grid = s2.feature_grid(res.user.resize_output_to_idx, bb.feature_hw(tile))
    return ImagePlan(fitted, sizes, s2, grid, bb.num_prefix_tokens + grid[0] * grid[1], bb.channels * len(sizes))


def storage_itemsize(dtype: str) -> int:
    return 2 if dtype == "float16" else 4


def dry_run(res: Resolved, samples: list[Sample]) -> dict[str, Any]:
    """The plan of every image, from headers only: no weights, no model, no pixels."""
    images, total_tiles, total_flops, total_bytes, unreadable = [], 0, 0.0, 0, []
    flops_known = True
    for s in samples:
        try:
            orig = image_size(s.source)
        except Exception as e:
            unreadable.append(failure(s, "read", e))
            continue
        p = plan_image(res, orig)
        nbytes = p.tokens * p.channels * storage_itemsize(res.user.dtype)
        flops = 0.0
        for sp in p.s2.scales:
            f = res.backbone.flops_per_tile(sp.tile)
            if f is None:
                flops_known = False
            else:
                flops += f * sp.num_tiles
        images.append({"key": s.key, "orig_hw": list(orig), "fitted_hw": list(p.fitted_hw), "tiles": p.s2.num_tiles,
                       "grids": p.s2.grids, "output_shape": [p.tokens, p.channels], "bytes": nbytes})
        total_tiles += p.s2.num_tiles
        total_flops += flops
        total_bytes += nbytes
    return {
        "model": res.user.model, "img_sizes": list(res.img_sizes), "max_split_size": res.max_split_size,
        "split_mode": res.user.split_mode, "fit": res.fit, "output": res.output,
        "images": images, "num_images": len(images), "unreadable": unreadable, "total_tiles": total_tiles,
        "bytes_per_image": images[0]["bytes"] if images and len({i["bytes"] for i in images}) == 1 else None,
        "total_bytes": total_bytes, "flops_estimate": total_flops if flops_known else None,
    }


def file_attrs(res: Resolved, weights: str) -> dict[str, Any]:
    bb = res.backbone
    return {
        "s2cli_version": __version__, "model": res.user.model, "weights": weights, "layer": bb.layer,
        "scales": json.dumps(list(res.scales)), "img_sizes": json.dumps(list(res.img_sizes)),
        "max_split_size": res.max_split_size, "split_mode": res.user.split_mode,
        "num_prefix_tokens": bb.num_prefix_tokens, "output_shape": bb.output_shape, "merge": "concat",
        "fit": res.fit, "dtype": res.user.dtype, "config": res.to_json(),
    }


class Extractor:
    """Holds the loaded backbone on its device; `features(batch)` runs the engine on fitted uint8 images."""

    def __init__(self, res: Resolved, backbone: Backbone, device: torch.device, dtype: torch.dtype):
        self.res, self.backbone, self.device, self.dtype = res, backbone, device, dtype
        bb = res.backbone
        self.mean = torch.tensor(bb.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(bb.std, device=device).view(1, 3, 1, 1)
        self.out_dtype = torch.float16 if res.user.dtype == "float16" else torch.float32
        backbone.to(device, dtype)

    @torch.inference_mode()
    def features(self, images: torch.Tensor, engine_sizes: list) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> features (B, T, C) in the storage dtype, on the CPU."""
        bb, u = self.res.backbone, self.res.user
        x = images.to(self.device, non_blocking=True).float().div_(255)
        x = ((x - self.mean) / self.std).to(self.dtype)
        out = multiscale_forward(
            self.backbone, x, img_sizes=engine_sizes, max_split_size=self.res.max_split_size,
            split_mode=u.split_mode, resize_output_to_idx=u.resize_output_to_idx,
            num_prefix_token=bb.num_prefix_tokens, output_shape=bb.output_shape, antialias=u.antialias,
            max_batch=u.max_tiles_per_call)
        if bb.output_shape == "bchw":
            out = out.flatten(2).transpose(1, 2)
        return out.to(self.out_dtype).cpu()


def run(res: Resolved, samples: list[Sample], backbone: Backbone,
        on_progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Extract every sample into `res.output`. Returns the summary. Failed samples are recorded, not fatal."""
    u = res.user
    device = resolve_device(u.device)
    dtype = resolve_precision(u.precision, device)
    ex = Extractor(res, backbone, device, dtype)
    uniform = res.fit != "keep"
    first = plan_image(res, (res.side, res.side))
    sink = HDF5Sink(res.output, file_attrs(res, backbone.weights), channels=first.channels,
                    num_scales=len(res.img_sizes), tokens=first.tokens if uniform else None, dtype=u.dtype)
    loader = torch.utils.data.DataLoader(
        ImageDataset(samples, res.fit, res.side, res.backbone.mean), batch_size=u.batch_size,
        num_workers=u.workers, collate_fn=collate, pin_memory=device.type == "cuda",
        worker_init_fn=_worker_init if u.workers else None)
    done = failed = 0
    t0 = time.perf_counter()
    try:
        for batch in loader:
            good = []
            for rec in batch:
                if rec["error"] is not None:
                    sink.fail(rec["error"])
                    failed += 1
                else:
                    good.append(rec)
            # images of one shape run together (always, unless fit=keep)
            groups: dict[tuple[int, ...], list[dict[str, Any]]] = {}
            for rec in good:
                groups.setdefault(tuple(rec["image"].shape), []).append(rec)
            items = []
            for recs in groups.values():
                plan = plan_image(res, rec_hw(recs[0]))
                for rec, feats in _forward_group(ex, recs, plan, sink):
                    items.append(_item(res, rec, plan, feats))
            failed += len(good) - len(items)
            items.sort(key=lambda it: it["index"])
            if items:
                sink.write(items)
            done += len(items)
            if on_progress:
                on_progress(done, failed)
        path = sink.close()
    except BaseException:
        sink.abort()
        raise
    seconds = time.perf_counter() - t0
    return {"output": str(path), "num_images": done, "num_failed": failed, "seconds": round(seconds, 3),
            "images_per_s": round(done / seconds, 3) if seconds > 0 else None, "weights": backbone.weights,
            "device": str(device)}


def rec_hw(rec: dict[str, Any]) -> tuple[int, int]:
    """The original size, which decides the fitted size (and so the plan) of the image."""
    return tuple(rec["orig_hw"])  # type: ignore[return-value]


def _forward_group(ex: Extractor, recs: list[dict[str, Any]], plan: ImagePlan, sink: HDF5Sink):
    """Features for images of one shape, in one engine call. If that call fails, each image is retried alone
    so only the image that fails is recorded (stage "model"); a configuration error stops the run."""
    try:
        return list(zip(recs, ex.features(torch.stack([r["image"] for r in recs]), plan.engine_sizes)))
    except ConfigError:
        raise
    except Exception as e:
        if len(recs) == 1:
            sink.fail(failure(Sample(recs[0]["key"], recs[0]["source"]), "model", e))
            return []
    out = []
    for r in recs:
        try:
            out.append((r, ex.features(r["image"][None], plan.engine_sizes)[0]))
        except ConfigError:
            raise
        except Exception as e:
            sink.fail(failure(Sample(r["key"], r["source"]), "model", e))
    return out


def _item(res: Resolved, rec: dict[str, Any], plan: ImagePlan, feats: torch.Tensor) -> dict[str, Any]:
    sizes = [(s, s) if isinstance(s, int) else tuple(s) for s in plan.engine_sizes]
    return {"index": rec["index"], "key": rec["key"], "source": rec["source"], "orig_hw": rec["orig_hw"],
            "grid_hw": plan.grid_hw, "img_sizes": sizes, "num_prefix_tokens": res.backbone.num_prefix_tokens,
            "split_mode": res.user.split_mode, "features": feats.numpy()}


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)
