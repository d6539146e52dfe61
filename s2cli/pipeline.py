"""Pipeline: one extraction end to end. Units of the input are cut into parts (one output shard each); samples
are decoded and fitted in worker processes, normalized on the device, run through the S² engine (all tiles of
all scales in as few backbone calls as allowed) and handed to the writer thread. A part's batches never mix
with another part's, so a resumed run computes exactly what an uninterrupted one would. Also the dry-run plan,
computed from image headers and the backbone's config alone."""
from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from . import __version__
from .backbones import Backbone
from .config import Resolved
from .errors import ConfigError, S2Error
from .launch import Rank, final_barrier, rank_device, resolve_precision
from .heartbeat import Heartbeat
from .outdir import OutputDir
from .sources import DecodePool, Fit, Input, Sample, Unit, failure, fit_size, image_size
from .strategies import (OutLayout, StrategyPlan, cut_view, grouped_calls, merge as merge_views, num_views,
                         out_groups, out_layout, outputs_to_maps, plan_strategy)
from .tiling import S2Plan, multiscale_forward, plan_multiscale
from .writers import SINKS, ThreadedSink, check_output_file, itemsize


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


def plan_strategy_image(res: Resolved, orig_hw: tuple[int, int]) -> tuple[StrategyPlan, OutLayout]:
    """A dynamic-resolution strategy's plan of one image and the layout of its output tokens."""
    bb = res.backbone
    plan = plan_strategy(res.strategy, orig_hw)  # type: ignore[arg-type]
    return plan, out_layout(res.strategy, plan, bb.feature_hw, bb.channels, bb.num_prefix_tokens)  # type: ignore[arg-type]


def _dry_entry(res: Resolved, orig: tuple[int, int]) -> tuple[dict[str, Any], float | None]:
    """One image's dry-run entry (fitted_hw, tiles = every backbone input, grids, output_shape) and its FLOPs."""
    if res.strategy is not None:
        plan, lay = plan_strategy_image(res, orig)
        inputs = [(v.tile, v.num_inputs) for v in plan.views]
        entry = {"fitted_hw": list(max((v.canvas for v in plan.views), key=lambda hw: hw[0] * hw[1])),
                 "tiles": plan.num_tiles, "grids": plan.grids, "output_shape": [lay.tokens, lay.channels],
                 "strategy": plan.strategy, "views": [v.name for v in plan.views]}
    else:
        p = plan_image(res, orig)
        inputs = [(sp.tile, sp.num_tiles) for sp in p.s2.scales]
        entry = {"fitted_hw": list(p.fitted_hw), "tiles": p.s2.num_tiles, "grids": p.s2.grids,
                 "output_shape": [p.tokens, p.channels]}
    per_tile = [res.backbone.flops_per_tile(tile) for tile, _ in inputs]
    flops = None if any(f is None for f in per_tile) else sum(f * n for f, (_, n) in zip(per_tile, inputs))  # type: ignore[operator]
    return entry, flops


def dry_run(res: Resolved, inp: Input) -> dict[str, Any]:
    """The plan of every image, from headers only: no weights, no model, no pixels."""
    images, total_tiles, total_flops, total_bytes, unreadable = [], 0, 0.0, 0, []
    flops_known = True
    for unit in inp.units:
        for s in unit.samples():
            if isinstance(s, dict):
                unreadable.append(s)
                continue
            try:
                orig = image_size(s)
            except Exception as e:
                unreadable.append(failure(s, "read", e))
                continue
            entry, flops = _dry_entry(res, orig)
            nbytes = entry["output_shape"][0] * entry["output_shape"][1] * itemsize(res.user.dtype)
            flops_known = flops_known and flops is not None
            images.append({"key": s.key, "orig_hw": list(orig), **entry, "bytes": nbytes})
            total_tiles += entry["tiles"]
            total_flops += flops or 0.0
            total_bytes += nbytes
            if res.user.limit and len(images) >= res.user.limit:
                break
    return {
        "model": res.user.model, "img_sizes": list(res.img_sizes), "max_split_size": res.max_split_size,
        "split_mode": res.user.split_mode, "fit": res.fit, "output": res.output, "input": inp.describe(),
        "strategy": res.user.strategy, "images": images, "num_images": len(images), "unreadable": unreadable, "total_tiles": total_tiles,
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
        "fit": res.fit, "dtype": res.user.dtype, "pool": res.user.pool, "config": res.to_json(),
        "strategy": res.user.strategy,
    }


def use_channels_last(res: Resolved) -> bool:
    """--channels-last, or by default on for ConvNets (bchw backbones), on CUDA and on the CPU alike (on this
    project's x86 CPU EfficientNet-Lite0 ran 1.45-1.63x faster with it: benchmarks/cpu_extract.py), off for ViTs."""
    if res.user.channels_last is not None:
        return res.user.channels_last
    return res.backbone.output_shape == "bchw"


def normalize_images(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 (3, H, W) or (B, 3, H, W) -> (x / 255 - mean) / std in `dtype` (mean, std shaped (3, 1, 1)). One
    float copy, then in place: out of place, (x - mean) / std held three float copies at once, which at the largest
    scale (32 x 3 x 1008 x 1008) was the batch's peak (benchmarks/bench_memory.py). The same operations in the same
    order, so the same values."""
    x = images.to(torch.float32, copy=True).div_(255)  # a copy even if given floats: never the caller's tensor
    x.sub_(mean).div_(std)
    return x.to(dtype)


class Extractor:
    """Holds the loaded backbone on its device; `submit(images)` starts the engine on fitted uint8 images (the
    copies to and from the device do not block on CUDA), `features(images)` waits for the result."""

    def __init__(self, res: Resolved, backbone: Backbone, device: torch.device, dtype: torch.dtype):
        from .devicepath import Transfer

        self.res, self.backbone, self.device, self.dtype = res, backbone, device, dtype
        bb = res.backbone
        self.mean = torch.tensor(bb.mean, device=device).view(3, 1, 1)  # broadcasts over (3, H, W) and (B, 3, H, W)
        self.std = torch.tensor(bb.std, device=device).view(3, 1, 1)
        self.out_dtype = torch.float16 if res.user.dtype == "float16" else torch.float32
        # stage timing, host seconds: normalize on the device; engine + copy back (+ waiting for it on CUDA)
        self.seconds = {"preprocess": 0.0, "forward": 0.0}
        self.transfer = Transfer(device)
        backbone.to(device, dtype)
        if use_channels_last(res):
            backbone.channels_last()
        if res.user.compile:
            backbone.compile()

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return normalize_images(images, self.mean, self.std, self.dtype)

    def _waited(self, s: float) -> None:
        self.seconds["forward"] += s

    @torch.inference_mode()
    def submit(self, images: torch.Tensor | list[torch.Tensor], engine_sizes: list) -> Any:
        """uint8 (B, 3, H, W) or a list of (3, H, W), on the host or the device -> a `devicepath.Pending` whose
        result() is (features (B, T, C) or None with --pool-only, pooled (B, C) or None), on the CPU in the
        storage dtype. On CUDA the batch goes up through pinned memory on a side stream and comes back into pinned
        buffers, so this returns while the GPU computes."""
        bb, u = self.res.backbone, self.res.user
        t0 = time.perf_counter()
        x = self.normalize(self.transfer.to_device(images))
        t1 = time.perf_counter()
        out = multiscale_forward(
            self.backbone, x, img_sizes=engine_sizes, max_split_size=self.res.max_split_size,
            split_mode=u.split_mode, resize_output_to_idx=u.resize_output_to_idx,
            num_prefix_token=bb.num_prefix_tokens, output_shape=bb.output_shape, antialias=u.antialias,
            max_batch=u.max_tiles_per_call)
        if bb.output_shape == "bchw":
            out = out.flatten(2).transpose(1, 2)
        pooled = None
        if u.pool == "mean":
            pooled = out[:, bb.num_prefix_tokens:].float().mean(dim=1).to(self.out_dtype)
        elif u.pool == "cls":
            pooled = out[:, 0].to(self.out_dtype)
        feats = None if u.pool_only else out.to(self.out_dtype)
        pending = self.transfer.to_host(feats, pooled, on_wait=self._waited)
        self.seconds["preprocess"] += t1 - t0
        self.seconds["forward"] += time.perf_counter() - t1
        return pending

    def features(self, images: torch.Tensor | list[torch.Tensor], engine_sizes: list) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """`submit` and wait: (features, pooled) on the CPU."""
        return self.submit(images, engine_sizes).result()

    @torch.inference_mode()
    def strategy_features(self, recs: list[dict[str, Any]]) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """A dynamic-resolution strategy over images whose views were rendered by the decode workers: the inputs
        of every view of every image go through the backbone together (one call per input size, capped by
        --max-tiles-per-call), then each image's features are merged. Returns (features (T, C), pooled (C,))."""
        bb, u, cfg = self.res.backbone, self.res.user, self.res.strategy
        t0 = time.perf_counter()
        plans = [plan_strategy_image(self.res, tuple(r["orig_hw"])) for r in recs]
        inputs = []
        for (plan, _), r in zip(plans, recs):
            pix = [self.normalize(a.to(self.device)) for a in r["image"]]
            inputs += [cut_view(pix[0 if plan.same_source else i], v) for i, v in enumerate(plan.views)]
        t1 = time.perf_counter()
        outs = iter(grouped_calls(self.backbone, inputs, u.max_tiles_per_call))
        results = []
        for plan, lay in plans:
            per_view = [outputs_to_maps(next(outs), bb.num_prefix_tokens, bb.output_shape, bb.feature_hw(v.tile))
                        for v in plan.views]
            tokens = merge_views(cfg, plan, per_view, lay)  # type: ignore[arg-type]
            pooled = None
            if u.pool == "mean":
                pooled = tokens[lay.prefix:].float().mean(dim=0).to(self.out_dtype).cpu()
            elif u.pool == "cls":
                pooled = tokens[0].to(self.out_dtype).cpu()
            results.append((None if u.pool_only else tokens.to(self.out_dtype).cpu(), pooled))
        self.seconds["preprocess"] += t1 - t0
        self.seconds["forward"] += time.perf_counter() - t1
        return results


@dataclass
class _Part:
    """An output shard in the making: unit, part number, its sink and what has gone into it."""

    unit: Unit
    part: int
    sink: ThreadedSink
    started: float
    seen: set
    first_key: str | None = None
    last_key: str | None = None


class Target:
    """Where a run writes: one file, or an output directory of shards (resumable)."""

    def __init__(self, res: Resolved, inp: Input, overwrite: bool, rank: Rank = Rank()):
        self.res, self.inp, self.ranks, self.rank = res, inp, rank, rank.rank
        self.dir = OutputDir(res.output) if res.output_is_dir else None
        self.heartbeat = None
        if rank.world > 1 and self.dir is None:
            raise ConfigError("several ranks share one output, which must then be a folder",
                              given=f"-o {res.output} with {rank.world} ranks ({rank.source})", fix="pass -o OUTDIR/")
        if self.dir is not None:
            run = {"s2cli_version": __version__, "input": inp.describe(), "config": res.to_dict(),
                   "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            self.dir.prepare(run, overwrite, res.compare_keys(), rank.rank, rank.world)
            self.done = {(m["unit_index"], m["part"]): m for m in self.dir.markers()}
            self.heartbeat = Heartbeat(self.dir.path, rank.rank, rank.world, rank.source)
        else:
            check_output_file(Path(res.output), overwrite)
            self.done = {}
        self._by_unit: dict[int, list[dict]] = {}
        for (u, _), m in self.done.items():
            self._by_unit.setdefault(u, []).append(m)

    @property
    def images_done_before(self) -> int:
        return sum(m["num_images"] for m in self.done.values())

    @property
    def failures_before(self) -> int:
        return sum(m["num_failed"] for m in self.done.values())

    def close(self, state: str, error: str | None = None) -> None:
        """Say in this rank's heartbeat how it ended (done or failed)."""
        if self.heartbeat is not None:
            self.heartbeat.close(state, error)
            self.heartbeat = None

    def unit_done(self, unit: Unit) -> bool:
        """Every part of the unit is done, so it need not even be read (a tar's part count is known from the
        marker of its last part)."""
        return _unit_complete(unit, self._by_unit.get(unit.index, []), self.res)


def _sink(res: Resolved, path: str, weights: str) -> ThreadedSink:
    if res.strategy is not None:  # token counts differ per image: always the ragged layout
        return SINKS[res.format](path, file_attrs(res, weights), channels=res.backbone.channels * len(out_groups(res.strategy)),
                                 num_scales=num_views(res.strategy), tokens=None, dtype=res.user.dtype,
                                 store_features=not res.user.pool_only, pooled=res.user.pool != "none")
    uniform = res.fit != "keep"
    first = plan_image(res, (res.side, res.side))
    sink = SINKS[res.format](path, file_attrs(res, weights), channels=first.channels, num_scales=len(res.img_sizes),
                             tokens=first.tokens if uniform else None, dtype=res.user.dtype,
                             store_features=not res.user.pool_only, pooled=res.user.pool != "none")
    if res.output_is_dir:
        sink.need_bytes = res.shard_size * first.tokens * first.channels * itemsize(res.user.dtype)
    return sink


def _work(inp: Input, target: Target) -> Iterator[tuple[Unit, int, Sample | dict | None]]:
    """(unit, part, sample) for every sample still to do; a sample of None marks an already-done part's sample
    (read past without decoding, so a resumed tar keeps its part boundaries)."""
    S = target.res.shard_size
    for unit in inp.units:
        if not target.ranks.owns(unit.index) or target.unit_done(unit):
            continue
        for i, s in enumerate(unit.samples()):
            part = i // S if target.dir is not None else 0
            yield unit, part, (None if (unit.index, part) in target.done else s)


def run(res: Resolved, inp: Input, target: Target, backbone: Backbone,
        on_progress: Callable[[int, int, int], None] | None = None) -> dict[str, Any]:
    """Extract every sample into the target. Failed samples are recorded, never substituted."""
    u = res.user
    device = rank_device(u.device, target.ranks)
    ex = Extractor(res, backbone, device, resolve_precision(u.precision, device))
    fit = Fit(res.fit, res.side, res.backbone.mean, res.strategy, u.decode)
    done = failed = 0
    shards: list[str] = []
    total_failed_before = target.failures_before
    t0 = time.perf_counter()
    cur: _Part | None = None
    batch: list[tuple[dict, _Part]] = []
    file_sink = _sink(res, res.output, backbone.weights) if target.dir is None else None
    next_index = target.dir.next_shard_index(target.rank) if target.dir is not None else 0
    file_keys: set[str] = set()
    # stage timing: seconds each stage was busy wherever it ran (decode workers, main thread, writer thread), and
    # the main thread's waits on the decode pool and on the writer (perf_counter sums; cheap)
    busy = {"read": 0.0, "decode": 0.0, "fit": 0.0, "write": 0.0}
    waits = {"decode": 0.0, "write": 0.0}

    # one batch in flight: a batch is submitted (on CUDA the GPU works on it while the main thread goes on), then
    # the batch before it is written; its features are complete by then (Pending.result waits for the copy back)
    in_flight: list[tuple[_Part, list[dict], list[Callable[[], list[dict]]]]] = []

    def flush() -> None:
        if not batch:
            return
        part = batch[0][1]
        recs = [rec for rec, _ in batch]
        batch.clear()
        on_fail = lambda r: record_failure(part, r)  # noqa: E731
        resolvers: list[Callable[[], list[dict]]] = []
        if res.strategy is not None:  # all images of the batch together, whatever their views' sizes
            done_items = [_strategy_item(res, rec, feats, pooled)
                          for rec, feats, pooled in _with_retry(ex.strategy_features, recs, on_fail, ex)]
            resolvers.append(lambda: done_items)
        else:
            if any("jpeg" in r for r in recs):  # --decode torch: decode and fit the batch on the device
                recs = device_decode(recs, part)
            groups: dict[tuple[int, ...], list[dict]] = {}
            for rec in recs:
                groups.setdefault(tuple(rec["image"].shape), []).append(rec)
            for g in groups.values():
                resolvers.append(_submit_group(ex, res, g, plan_image(res, tuple(g[0]["orig_hw"])), on_fail))
        drain()
        in_flight.append((part, recs, resolvers))

    def device_decode(recs: list[dict], part: _Part) -> list[dict]:
        from .devicepath import decode_batch

        todo = [r for r in recs if "jpeg" in r]
        decode_batch(todo, fit, device)
        for r in todo:
            d, f = r.pop("device_seconds")
            busy["decode"] += d
            busy["fit"] += f
        kept = []
        for r in recs:
            if r["error"] is not None:
                record_failure(part, r["error"])
            else:
                kept.append(r)
        return kept

    def drain() -> None:
        nonlocal done
        while in_flight:
            part, recs, resolvers = in_flight.pop(0)
            items = [it for resolve in resolvers for it in resolve()]
            order = {id(rec): i for i, rec in enumerate(recs)}
            items.sort(key=lambda it: order[it.pop("_rec_id")])
            if items:
                t = time.perf_counter()
                part.sink.write(items)
                waits["write"] += time.perf_counter() - t
                done += len(items)
            if on_progress:
                on_progress(done, failed, len(shards))
            if target.heartbeat is not None:
                target.heartbeat.update(images=done, failed=failed)

    def finish_part(last_of_unit: bool) -> None:
        nonlocal cur
        flush()
        drain()
        if cur is None or target.dir is None:
            return
        t = time.perf_counter()
        path = cur.sink.close()
        waits["write"] += time.perf_counter() - t
        busy["write"] += cur.sink.busy_s
        target.dir.commit({
            "shard": path.name, "unit": cur.unit.id, "unit_index": cur.unit.index, "part": cur.part,
            "rank": target.rank, "num_images": cur.sink.n, "num_failed": len(cur.sink.failures),
            "failures": cur.sink.failures, "first_key": cur.first_key, "last_key": cur.last_key,
            "seconds": round(time.perf_counter() - cur.started, 3), "s2cli_version": __version__,
            "last_part": last_of_unit, "finished_at": time.time(),
            "started_at": time.time() - (time.perf_counter() - cur.started), "host": socket.gethostname(),
        }, log_errors=target.ranks.world == 1)
        shards.append(path.name)
        if target.heartbeat is not None:
            target.heartbeat.update(shards_written=len(shards), images=done, failed=failed, shard=None, write=True)
        cur = None
        if on_progress:
            on_progress(done, failed, len(shards))

    def start_part(unit: Unit, part: int) -> _Part:
        nonlocal next_index
        if target.dir is None:  # one file: one key space across all units
            return _Part(unit, part, file_sink, time.perf_counter(), file_keys)  # type: ignore[arg-type]
        name = f"part-{target.rank:05d}-{next_index:05d}{SINKS[res.format].suffix}"
        next_index += 1
        if target.heartbeat is not None:
            target.heartbeat.update(unit=unit.id, unit_index=unit.index, part=part, shard=name, write=True)
        return _Part(unit, part, _sink(res, str(target.dir.path / name), backbone.weights), time.perf_counter(), set())

    def record_failure(part: _Part, rec: dict[str, str]) -> None:
        nonlocal failed
        part.sink.fail(rec)
        failed += 1
        if u.on_error == "stop":
            raise S2Error(f"stopping at the first failure (--on-error stop): {rec['key']} [{rec['stage']}] "
                          f"{rec['error_class']}: {rec['error']} ({rec['source']})",
                          fix="fix or remove that input, or use --on-error skip to record failures and go on")
        if u.max_failures is not None and failed + total_failed_before > u.max_failures:
            raise S2Error(f"{failed + total_failed_before} samples failed, more than --max-failures {u.max_failures}; "
                          f"the last: {rec['key']} [{rec['stage']}] {rec['error']}",
                          fix="look at the failure records (errors.jsonl or `s2 inspect`), fix the input, rerun to resume")

    work = _work(inp, target)
    # a whole next batch (and then some) decodes while the current one runs: the pool submits a sample only when
    # the loop asks for the next record, so a window of one batch would leave the next batch's last samples to
    # be decoded after the forward, on the critical path
    pool = DecodePool(fit, u.workers, timeout=u.decode_timeout, window=max(4 * u.workers, 2 * u.batch_size))
    try:
        for (unit, part_no, sample), rec in _timed(pool.map(work, lambda w: _ALREADY_DONE if w[2] is None else w[2]),
                                                   waits, "decode"):
            for stage, s in zip(("read", "decode", "fit"), rec.get("seconds", ())):
                busy[stage] += s
            if sample is None:
                continue  # a sample of a part already done: read past, not decoded
            if cur is None or (cur.unit.index, cur.part) != (unit.index, part_no):
                finish_part(last_of_unit=cur is not None and cur.unit.index != unit.index)
                cur = start_part(unit, part_no)
            key = rec["key"]
            if key in cur.seen:
                record_failure(cur, {"key": key, "source": rec.get("source") or rec["error"]["source"], "stage": "read",
                                     "error_class": "DuplicateKey",
                                     "error": f"key {key!r} appears again in {unit.id}; the first one is kept"})
                continue
            cur.seen.add(key)
            if rec["error"] is not None:
                record_failure(cur, rec["error"])
                continue
            cur.first_key = cur.first_key or key
            cur.last_key = key
            img = rec["image"]
            if img is not None:  # None: JPEG bytes for the device decoder (--decode torch)
                rec["image"] = [torch.from_numpy(a) for a in img] if isinstance(img, list) else torch.from_numpy(img)
            batch.append((rec, cur))
            if len(batch) >= u.batch_size:
                flush()
        finish_part(last_of_unit=True)
        if file_sink is not None:
            t = time.perf_counter()
            file_sink.close()
            waits["write"] += time.perf_counter() - t
            busy["write"] += file_sink.busy_s
    except BaseException as e:
        if cur is not None and cur.sink is not file_sink:
            cur.sink.abort()
        if file_sink is not None:
            file_sink.abort()
        target.close("failed", e.one_line() if isinstance(e, S2Error) else f"{type(e).__name__}: {e}")
        raise
    finally:
        pool.close()
    seconds = time.perf_counter() - t0
    summary: dict[str, Any] = {
        "output": res.output, "num_images": done, "num_failed": failed, "seconds": round(seconds, 3),
        "images_per_s": round(done / seconds, 3) if seconds > 0 else None, "weights": backbone.weights,
        "device": str(device), "compile": u.compile,
        "stage_seconds": {k: round(v, 4) for k, v in {**busy, **ex.seconds}.items()},
        "wait_seconds": {k: round(v, 4) for k, v in waits.items()}}
    if u.compile:
        from .backbones import compile_cache_stats

        summary["compile_cache"] = compile_cache_stats()
    if target.dir is not None:
        def units_done(markers: list[dict]) -> int:
            by_unit: dict[int, list[dict]] = {}
            for m in markers:
                by_unit.setdefault(m["unit_index"], []).append(m)
            return sum(1 for unit in inp.units if _unit_complete(unit, by_unit.get(unit.index, []), res))

        ranks = target.ranks
        target.close("done")
        if ranks.world == 1:
            manifest = target.dir.write_manifest(len(inp.units), units_done(target.dir.markers()))
        else:
            # no group needed: every rank rewrites the manifest until it is current, unless a torchrun barrier
            # says all ranks are done, and then rank 0 alone writes it
            together = final_barrier(ranks)
            if together and ranks.rank != 0:
                ms = target.dir.markers()
                manifest = target.dir.manifest(ms, len(inp.units), units_done(ms))
            else:
                manifest = target.dir.write_manifest(len(inp.units), units_done)
            summary.update(rank=ranks.rank, world=ranks.world, rank_source=ranks.source,
                           writes_summary=together and ranks.rank == 0)
        summary.update(shards_written=len(shards), resumed_images=target.images_done_before,
                       total_images=manifest["num_images"], total_failed=manifest["num_failed"],
                       complete=manifest["complete"])
    return summary


def _timed(it: Iterator[Any], acc: dict[str, float], key: str) -> Iterator[Any]:
    """`it`, adding the seconds spent waiting for each item to acc[key]."""
    it = iter(it)
    while True:
        t = time.perf_counter()
        try:
            x = next(it)
        except StopIteration:
            return
        acc[key] += time.perf_counter() - t
        yield x


# what the decode pool is given for a sample of a part already done: passed through, never decoded
_ALREADY_DONE = {"key": "", "stage": "", "error": "", "error_class": "", "source": ""}


def _unit_complete(unit: Unit, markers: list[dict], res: Resolved) -> bool:
    """Every part of the unit has a done marker. A tar's part count is known only once it was read to the end:
    the marker of its last part says so."""
    parts = {m["part"] for m in markers}
    if unit.size is not None:
        return len(parts) >= max(1, -(-unit.size // res.shard_size))
    last = [m["part"] for m in markers if m.get("last_part")]
    return bool(last) and parts >= set(range(last[0] + 1))


def _submit_group(ex: Extractor, res: Resolved, recs: list[dict[str, Any]], plan: ImagePlan,
                  on_fail: Callable[[dict], None]) -> Callable[[], list[dict[str, Any]]]:
    """Start the engine on images of one shape (one call; on CUDA it returns while the GPU works) and return what
    waits for it and makes the sink's items. If the call fails, each image is retried alone (`_with_retry`)."""
    def compute(rs: list[dict[str, Any]]) -> list[tuple[Any, Any]]:
        feats, pooled = ex.features([r["image"] for r in rs], plan.engine_sizes)
        return [(None if feats is None else feats[i], None if pooled is None else pooled[i]) for i in range(len(rs))]

    def items(results: list[tuple[dict[str, Any], Any, Any]]) -> list[dict[str, Any]]:
        return [_item(res, rec, plan, feats, pooled) for rec, feats, pooled in results]

    try:
        pending = ex.submit([r["image"] for r in recs], plan.engine_sizes)
    except ConfigError:
        raise
    except Exception as e:
        done = items(_with_retry(compute, recs, on_fail, ex, failed=e))
        return lambda: done

    def resolve() -> list[dict[str, Any]]:
        try:
            feats, pooled = pending.result()
        except ConfigError:
            raise
        except Exception as e:
            return items(_with_retry(compute, recs, on_fail, ex, failed=e))
        return items(_finite([(r, None if feats is None else feats[i], None if pooled is None else pooled[i])
                              for i, r in enumerate(recs)], ex, on_fail))
    return resolve


def _with_retry(compute: Callable[[list[dict[str, Any]]], list[tuple[Any, Any]]], recs: list[dict[str, Any]],
                on_fail: Callable[[dict], None], ex: Extractor,
                failed: Exception | None = None) -> list[tuple[dict[str, Any], Any, Any]]:
    """(rec, features, pooled) for images computed together. If that call fails (or already `failed`), each image
    is retried alone so only the image that fails is recorded (stage "model"); a configuration error stops the run."""
    if failed is None:
        try:
            return _finite([(r, f, p) for r, (f, p) in zip(recs, compute(recs))], ex, on_fail)
        except ConfigError:
            raise
        except Exception as e:
            failed = e
    if len(recs) == 1:
        on_fail(failure(Sample(recs[0]["key"], recs[0]["source"]), "model", failed))
        return []
    out = []
    for r in recs:
        try:
            out.append((r, *compute([r])[0]))
        except ConfigError:
            raise
        except Exception as e:
            on_fail(failure(Sample(r["key"], r["source"]), "model", e))
    return _finite(out, ex, on_fail)


def _finite(results: list[tuple[dict, Any, Any]], ex: Extractor, on_fail: Callable[[dict], None]) -> list:
    """With --check-finite (the default), an image whose stored features or pooled vector hold NaN or Inf (an fp16
    overflow, a broken checkpoint) is recorded (stage "model", NonFiniteFeatures) instead of written."""
    if not ex.res.user.check_finite:
        return results
    kept = []
    for r, f, p in results:
        bad = [(name, t) for name, t in (("features", f), ("pooled", p)) if t is not None and not bool(torch.isfinite(t).all())]
        if not bad:
            kept.append((r, f, p))
            continue
        name, t = bad[0]
        nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        hint = ("the float16 storage overflowed: use --dtype float32" if ex.res.user.dtype == "float16" and
                f is not None else "try --precision fp32" if ex.res.user.precision != "fp32" else "check the weights")
        on_fail(failure(Sample(r["key"], r["source"]), "model",
                        f"{name} hold {nan} NaN and {inf} Inf values of {t.numel()}; {hint} "
                        "(--no-check-finite stores them anyway)", "NonFiniteFeatures"))
    return kept


def _item(res: Resolved, rec: dict[str, Any], plan: ImagePlan, feats, pooled) -> dict[str, Any]:
    sizes = [(s, s) if isinstance(s, int) else tuple(s) for s in plan.engine_sizes]
    return {"_rec_id": id(rec), "key": rec["key"], "source": rec["source"], "meta": rec.get("meta"),
            "orig_hw": rec["orig_hw"], "grid_hw": plan.grid_hw, "img_sizes": sizes,
            "num_prefix_tokens": res.backbone.num_prefix_tokens, "split_mode": res.user.split_mode,
            "features": None if feats is None else feats.numpy(), "pooled": None if pooled is None else pooled.numpy()}


def _strategy_item(res: Resolved, rec: dict[str, Any], feats, pooled) -> dict[str, Any]:
    """A strategy's image for the sink: `img_sizes` holds each view's canvas ((0, 0) for an absent thumbnail), and
    `plan` (JSON) the strategy, views with their grids and tiles, tile count, thumbnail/base, and output maps."""
    plan, lay = plan_strategy_image(res, tuple(rec["orig_hw"]))
    sizes = [list(v.canvas) for v in plan.views]
    sizes += [[0, 0]] * (num_views(res.strategy) - len(sizes))  # type: ignore[arg-type]
    meta = {"strategy": plan.strategy, "tiles": plan.num_tiles, "grids": plan.grids,
            "views": [{"name": v.name, "grid": list(v.grid), "tile": list(v.tile), "resize": list(v.resize),
                       "canvas": list(v.canvas), "cut": v.cut} for v in plan.views],
            "thumbnail": plan.view("thumbnail") is not None, "base": plan.view("base") is not None,
            "output_grid": list(lay.grid_hw), "output": lay.to_dict()}
    return {"_rec_id": id(rec), "key": rec["key"], "source": rec["source"], "meta": rec.get("meta"),
            "orig_hw": rec["orig_hw"], "grid_hw": lay.grid_hw, "img_sizes": sizes,
            "num_prefix_tokens": res.backbone.num_prefix_tokens, "split_mode": res.user.split_mode,
            "plan": json.dumps(meta), "features": None if feats is None else feats.numpy(),
            "pooled": None if pooled is None else pooled.numpy()}
