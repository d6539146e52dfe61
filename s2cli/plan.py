"""Planning, without torch: what the engine does with each image, from its header and the backbone's config alone
(`plan_image`, `dry_run`), and `views`: the decoded, fitted pixels of one image exactly as the backbone receives
them, through the extraction's own decode path (`inputs.decode.decode_sample`)."""
from __future__ import annotations

import os
from dataclasses import replace
from typing import Any, Iterator

import numpy as np

from .config import Resolved, resolve_options
from .dtypes import entry_bytes, itemsize, pooled_dtype
from .errors import ConfigError
from .inputs.decode import Decoded, Fit, decode_sample
from .inputs.reading import image_size, is_video, video_header
from .inputs.samples import Sample, failure
from .inputs.units import Input
from .strategies import Planner, strategy_of
from .video import choose


def fit_of(res: Resolved) -> Fit:
    """How the decode workers bring every image of this config to the engine's input, and plan it (once)."""
    return Fit(res.fit, res.side, res.backbone.mean, res.strategy_cfg, res.decode, strategy_of(res).render, res.retries,
               res.sampling, Planner(res), res.backbone.crop_round)


def plan_entry(res: Resolved, orig: tuple[int, int]) -> tuple[dict[str, Any], float | None]:
    """One image's dry-run entry (fitted_hw, tiles = every backbone input, grids, output_shape, and the
    strategy's own fields) and its FLOPs (None when the backbone's FLOPs per tile are unknown)."""
    entry, inputs = strategy_of(res).plan_entry(res, orig)
    entry = res.stored(entry)  # what is stored: the grid and shape after --reduce
    if res.layers is not None:  # one (T, C) per layer, from the same forward (FLOPs: to the deepest one)
        entry = {**entry, "layers": list(res.layers), "output_shape": [res.num_layers, *entry["output_shape"]]}
    per_tile = [res.backbone.flops_per_tile(tile) for tile, _ in inputs]
    flops = None if any(f is None for f in per_tile) else sum(f * n for f, (_, n) in zip(per_tile, inputs))  # type: ignore[misc]
    return entry, flops


def dry_run(res: Resolved, inp: Input) -> dict[str, Any]:
    """The plan of every image, from headers only: no weights, no model, no pixels, no torch."""
    images: list[dict[str, Any]] = []
    unreadable: list[dict[str, str]] = []
    total_tiles, total_flops, total_bytes, flops_known = 0, 0.0, 0, True
    for s in _samples(inp, res.limit, unreadable):
        try:
            video = video_plan(res, s) if is_video(s) else None
            orig = tuple(video["hw"]) if video else image_size(s)
        except Exception as e:
            unreadable.append(failure(s, "read", e))
            continue
        entry, flops = plan_entry(res, orig)
        n_layers = res.num_layers  # --layers: an image's layers stored as L x T rows, its pooled row L x C
        pooled_channels = entry.get("reduced_from", entry)["output_shape"][-1] * n_layers
        rows = [entry["output_shape"][-2] * n_layers, entry["output_shape"][-1]]
        nbytes = stored_bytes(res, rows, pooled_channels)
        if video:  # every chosen frame is planned as an image of the video's size
            n = len(video["frame_indices"])
            entry["tiles"], flops = entry["tiles"] * n, None if flops is None else flops * n
            # one entry per frame, or one (frames, tokens, channels) entry
            nbytes = nbytes * n if res.frames_as_images else stored_bytes(res, rows, pooled_channels, n)
            if not res.frames_as_images:
                entry["output_shape"] = [n, *entry["output_shape"]]
        flops_known = flops_known and flops is not None
        images.append({"key": s.key, "orig_hw": list(orig), **({"video": video} if video else {}), **entry,
                       "bytes": nbytes})
        total_tiles += entry["tiles"]
        total_flops += flops or 0.0
        total_bytes += nbytes
    return {
        "model": res.model, "img_sizes": list(res.img_sizes), "max_split_size": res.max_split_size,
        "split_mode": res.split_mode, "fit": res.fit, "output": res.output, "input": inp.describe(),
        "strategy": res.strategy, "images": images, "num_images": len(images), "unreadable": unreadable,
        "total_tiles": total_tiles,
        "bytes_per_image": images[0]["bytes"] if images and len({i["bytes"] for i in images}) == 1 else None,
        "total_bytes": total_bytes, "flops_estimate": total_flops if flops_known else None,
    }


def video_plan(res: Resolved, sample: Sample) -> dict[str, Any]:
    """A video's dry-run facts from its container header: frames, duration, rate, size, rotation, codec, and the
    frames the sampling would take, with their timestamps, for frames evenly spaced at the header's rate (the run
    reads the real timestamps)."""
    if not res.sampling.active:
        raise ValueError("a video, and no frame sampling was given (--num-frames N, --fps F or --max-frames M)")
    h = video_header(sample)
    rate = h.rate or 1.0
    times = [i / rate for i in range(h.frames)]
    chosen = choose(times, res.sampling)
    return {**h.to_dict(), "frame_indices": chosen, "timestamps": [round(times[i], 6) for i in chosen]}


def stored_bytes(res: Resolved, output_shape: list[int] | tuple[int, int], pooled_channels: int | None = None,
                 frames: int = 1) -> int:
    """Bytes one entry's stored arrays take in the storage dtype: its features, (frames x) tokens x channels as
    stored with their int8/float8 scales (none with --pool-only), and its pooled vector (with --pool mean|cls;
    `pooled_channels` wide, the channels before a space-to-channel reduction)."""
    tokens, channels = output_shape
    pooled = res.pooled_width(pooled_channels or channels) * itemsize(pooled_dtype(res.dtype)) if res.pool != "none" else 0
    return (0 if res.pool_only else entry_bytes(frames * tokens, channels, res.dtype)) + pooled


def _samples(inp: Input, limit: int | None, unreadable: list[dict[str, str]]) -> Iterator[Sample]:
    """Every readable sample of the input (at most `limit`); stream failures go to `unreadable`."""
    n = 0
    for unit in inp.units:
        for s in unit.samples():
            if limit and n >= limit:  # every sample counts, as in the run: a failure record too
                return
            n += 1
            if isinstance(s, dict):
                unreadable.append(s)
                continue
            yield s


def views(image: str | os.PathLike | bytes, config: Resolved | None = None, **options: Any) -> list[np.ndarray]:
    """The decoded, fitted views of one image for a config, as (3, H, W) uint8 arrays in backbone order: what the
    decode workers hand the engine (EXIF orientation, alpha on white, 16-bit scaled, then the fit or the strategy's
    rendering). S² has one view, the image fitted to the largest scale (the engine derives the smaller scales from
    it); a dynamic-resolution strategy has one per view it renders. `config` is a resolved config; else `options`
    are `s2cli.extract`'s keyword options (model, recipe, scales, strategy, ...). No weights load, torch is not
    imported.

        >>> [v.shape for v in s2cli.views("cat.jpg", model="clip-vit-l-336", scales=(1, 2))]
        [(3, 672, 672)]
    """
    res = config if config is not None else resolve_options("<views>", "views.h5", **options)
    return views_of(decoded(image, res).pixels)


def views_of(pixels: Any) -> list[np.ndarray]:
    """A decoded record's pixels as a list of views (S²: its one fitted image)."""
    return list(pixels) if isinstance(pixels, list) else [pixels]


def _decoded_or_raise(src: str | os.PathLike | bytes, res: Resolved, what: str, fix: str) -> tuple[Sample, Decoded]:
    """(the sample, its decoded record) as the extraction's decode path makes it; a failure is one ConfigError."""
    sample = Sample(what, "<bytes>", data=src) if isinstance(src, bytes) else Sample(what, os.fspath(src))
    rec = _decode(sample, res)
    if rec.error is not None:
        e = rec.error
        raise ConfigError(f"cannot decode the {what} ({e['stage']}: {e['error_class']}: {e['error']})",
                          given=e["source"], fix=fix)
    return sample, rec


def decoded(image: str | os.PathLike | bytes, res: Resolved) -> Decoded:
    """One image's decoded record (its size as displayed, its plan, its views in `pixels`): see `views`."""
    sample, rec = _decoded_or_raise(image, res, "image", "pass a readable image file")
    if rec.frames is not None:
        raise ConfigError("this is a video: its frames are chosen by a sampling", given=sample.source,
                          fix="use s2cli.plan.decoded_video (or `s2 viz plan VIDEO --num-frames N`)")
    return rec


def decoded_video(video: str | os.PathLike | bytes, res: Resolved) -> tuple[dict[str, Any], list[list[np.ndarray]]]:
    """A video's chosen frames as the backbone receives them: (the chosen frames' indices and timestamps, with the
    video facts, as stored in its entry's metadata; each frame's views, as `views` gives an image's)."""
    sample, rec = _decoded_or_raise(video, res, "video", "pass a readable video file, with --num-frames N or --fps F")
    if rec.frames is None:
        raise ConfigError("not a video", given=sample.source, fix="pass a video file (mp4, webm, mkv, mov, avi)")
    return rec.video, [views_of(f) for f in rec.frames]  # type: ignore[return-value]


def _decode(sample: Sample, res: Resolved) -> Decoded:
    fit = fit_of(res)
    if fit.decode != "pil":  # the device decoder needs torch; views are Pillow's, which it matches within 2/255
        fit = replace(fit, decode="pil")
    return decode_sample(sample, fit)


RECIPE_IMAGE_HW = (768, 1024)  # the image size `s2 recipes` states each recipe's output for


def recipe_rows(image_hw: tuple[int, int] = RECIPE_IMAGE_HW) -> list[dict[str, Any]]:
    """Every shipped recipe: its model, scales (S²) or strategy, the tiles and output (tokens, channels) of an image
    of `image_hw` as planned (no weights, no torch), the description, the settings and the file."""
    from .config import list_recipes, load_recipe

    rows = []
    for name, path in sorted(list_recipes().items()):
        values, doc = load_recipe(name)
        res = resolve_options("<recipe>", "recipe.h5", name)
        entry, _ = plan_entry(res, image_hw)
        rows.append({"name": name, "model": res.model, "img_sizes": list(res.img_sizes), "strategy": res.strategy,
                     "plan": strategy_of(res).describe(res),
                     "image_hw": list(image_hw), "tiles": entry["tiles"], "output_shape": entry["output_shape"],
                     "description": doc.get("description", ""), "config": values, "path": str(path)})
    return rows
