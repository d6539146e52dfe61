"""S² tensor math: plan each scale's tiles, cut them, run the backbone on all of them, stitch, pool, concat. No I/O.

`multiscale_forward` is a drop-in replacement for the reference `s2wrapper.forward` (Shi et al., ECCV 2024):
square inputs follow the reference master branch, non-square inputs, (h, w) sizes and `split_mode="pad"`
follow its any-shape branch (with its `scales=` TypeError fixed). See ../shared/SPEC.md and the README.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence, Union

from ._lazy import F, torch

from .errors import ConfigError

Size = Union[int, Sequence[int]]
SPLIT_MODES = ("resize", "pad")
OUTPUT_SHAPES = ("bnc", "bchw")
MERGES = ("concat", "none")


@dataclass(frozen=True)
class ScalePlan:
    """One scale: the scaled image size, how it is brought to a whole number of tiles, and the tile grid."""

    size: tuple[int, int]  # (h, w) of the image at this scale
    canvas: tuple[int, int]  # (h, w) it is resized or padded to before cutting; equals size on the square branch
    grid: tuple[int, int]  # tiles (rows, cols)
    tile: tuple[int, int]  # (h, w) of one tile

    @property
    def num_tiles(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass(frozen=True)
class S2Plan:
    """Every scale's plan for one input size. `branch` is "square" (reference master) or "any_shape"."""

    input_hw: tuple[int, int]
    scales: tuple[ScalePlan, ...]
    branch: str
    split_mode: str

    @property
    def num_tiles(self) -> int:
        return sum(s.num_tiles for s in self.scales)

    @property
    def grids(self) -> list[list[int]]:
        return [list(s.grid) for s in self.scales]

    def feature_grid(self, idx: int, feat_hw_per_tile: tuple[int, int]) -> tuple[int, int]:
        """Token grid of scale `idx` after stitching (and, in pad mode, cropping), for a backbone giving
        `feat_hw_per_tile` features per tile."""
        sp = self.scales[idx]
        fh, fw = sp.grid[0] * feat_hw_per_tile[0], sp.grid[1] * feat_hw_per_tile[1]
        if self.split_mode == "pad" and self.branch == "any_shape":
            return _pad_crop_size(sp, (fh, fw))
        return fh, fw


def _pad_crop_size(sp: ScalePlan, feat_hw: tuple[int, int]) -> tuple[int, int]:
    # the reference's expression, kept float-for-float so ragged sizes round the same way
    return (
        math.ceil(sp.size[0] / sp.canvas[0] * feat_hw[0]),
        math.ceil(sp.size[1] / sp.canvas[1] * feat_hw[1]),
    )


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_positive(name: str, value: object) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
        raise ConfigError(f"{name} must be positive", given=value, expected="a number > 0",
                          fix=f"pass a positive {name}, e.g. scales=[1, 2] or img_sizes=[336, 672]")


def plan_multiscale(
    input_hw: tuple[int, int],
    scales: Sequence[float] | None = None,
    img_sizes: Sequence[Size] | None = None,
    max_split_size: int | None = None,
    split_mode: str = "resize",
) -> S2Plan:
    """Plan the tiles of every scale for an input of `input_hw`, exactly as the reference does.

    `img_sizes` wins over `scales`; sizes from scales truncate (`int(side * scale)`). Square inputs with int
    sizes and `split_mode="resize"` take the reference master branch (n = ceil(size / split) tiles of
    size / n); everything else takes the any-shape branch (tiles of exactly `max_split_size`).
    """
    h, w = int(input_hw[0]), int(input_hw[1])
    if split_mode not in SPLIT_MODES:
        raise ConfigError("split_mode is not known", given=split_mode, expected=" or ".join(SPLIT_MODES),
                          fix='use split_mode="resize" (the reference default) or "pad"')
    if scales is None and img_sizes is None:
        raise ConfigError("neither scales nor img_sizes was given", expected="one of them",
                          fix="pass scales=[1, 2] (relative to the input) or img_sizes=[336, 672]")
    if img_sizes is not None:
        img_sizes = list(img_sizes)
        if not img_sizes:
            raise ConfigError("img_sizes is empty", given=img_sizes, expected="at least one size",
                              fix="pass e.g. img_sizes=[336, 672]")
        all_int = all(_is_int(s) for s in img_sizes)
        all_pair = all(isinstance(s, (tuple, list)) and len(s) == 2 and all(_is_int(v) for v in s) for s in img_sizes)
        if not (all_int or all_pair):
            raise ConfigError("img_sizes must be all ints (square) or all (h, w) pairs (non-square)",
                              given=img_sizes, fix="write img_sizes=[336, 672] or img_sizes=[(336, 448), (672, 896)]")
        for s in img_sizes:
            for v in ([s] if all_int else s):
                _check_positive("img_sizes", v)
    else:
        scales = list(scales)  # type: ignore[arg-type]
        if not scales:
            raise ConfigError("scales is empty", given=scales, expected="at least one scale", fix="pass e.g. scales=[1, 2]")
        for s in scales:
            _check_positive("scales", s)
    if max_split_size is not None:
        if not _is_int(max_split_size) or max_split_size <= 0:
            raise ConfigError("max_split_size must be a positive int", given=max_split_size,
                              fix="pass the backbone's input size, e.g. max_split_size=336")

    square = h == w and split_mode == "resize" and (img_sizes is None or all(_is_int(s) for s in img_sizes))
    if square:
        sizes = list(img_sizes) if img_sizes is not None else [int(h * s) for s in scales]  # type: ignore[union-attr]
        split = max_split_size or h
        plans = []
        for size in sizes:
            n = math.ceil(size / split)
            if size % n:
                raise ConfigError(
                    f"image size {size} cannot be cut into {n}x{n} equal tiles (max_split_size={split})",
                    given=size, expected=f"a multiple of {n}",
                    fix=f"use a size divisible by {n} (e.g. {n * split}) or a max_split_size that divides it")
            t = size // n
            if t <= 0:
                raise ConfigError("scale too small for one pixel per tile", given=size, fix="use larger scales")
            plans.append(ScalePlan((size, size), (size, size), (n, n), (t, t)))
        return S2Plan((h, w), tuple(plans), "square", split_mode)

    # any-shape branch
    if img_sizes is None:
        # the reference raises TypeError here (it iterates img_sizes while it is None); the intended sizes:
        sizes2 = [(int(h * s), int(w * s)) for s in scales]  # type: ignore[union-attr]
    elif all(_is_int(s) for s in img_sizes):
        sizes2 = [(s, s) for s in img_sizes]
    else:
        sizes2 = [(int(s[0]), int(s[1])) for s in img_sizes]
    for s in sizes2:
        if s[0] <= 0 or s[1] <= 0:
            raise ConfigError("a scale gives an empty image", given=s, fix="use larger scales")
    if max_split_size is None:
        if h != w:
            raise ConfigError("max_split_size is required for non-square inputs", given=(h, w),
                              fix="pass the backbone's input size, e.g. max_split_size=336")
        max_split_size = h
    S = max_split_size
    plans = []
    for s in sizes2:
        nh, nw = math.ceil(s[0] / S), math.ceil(s[1] / S)
        plans.append(ScalePlan(s, (nh * S, nw * S), (nh, nw), (S, S)))
    return S2Plan((h, w), tuple(plans), "any_shape", split_mode)


def split_tiles(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, C, nh*h, nw*w) -> (nh*nw*B, C, h, w), tile-major: index (row * nw + col) * B + b (reference order)."""
    B, C, H, W = x.shape
    nh, nw = grid
    h, w = H // nh, W // nw
    return x.reshape(B, C, nh, h, nw, w).permute(2, 4, 0, 1, 3, 5).reshape(nh * nw * B, C, h, w)


def merge_tiles(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of `split_tiles`: (nh*nw*B, C, h, w) -> (B, C, nh*h, nw*w)."""
    N, C, h, w = x.shape
    nh, nw = grid
    B = N // (nh * nw)
    return x.reshape(nh, nw, B, C, h, w).permute(2, 3, 0, 4, 1, 5).reshape(B, C, nh * h, nw * w)


def resize_image(x: torch.Tensor, size: tuple[int, int], antialias: bool = False) -> torch.Tensor:
    """Bicubic resize in float32, cast back to the input dtype (the reference's rule). The same size is an
    exact identity, so it is skipped. `antialias` applies only when a side shrinks."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    aa = antialias and (size[0] < x.shape[-2] or size[1] < x.shape[-1])
    return F.interpolate(x.to(torch.float32), size=size, mode="bicubic", antialias=aa).to(x.dtype)


def area_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Area (adaptive average) resize of a feature map in float32, cast back; identity when the size agrees."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x.to(torch.float32), size=size, mode="area").to(x.dtype)


def cut_scale(x: torch.Tensor, sp: ScalePlan, split_mode: str, antialias: bool = False) -> torch.Tensor:
    """Image batch at input size -> this scale's tiles, (num_tiles * B, C, th, tw)."""
    y = resize_image(x, sp.size, antialias)
    if sp.canvas != sp.size:
        if split_mode == "resize":
            y = resize_image(y, sp.canvas, antialias)
        else:  # zero padding bottom/right, in normalized tensor space
            y = F.pad(y, (0, sp.canvas[1] - sp.size[1], 0, sp.canvas[0] - sp.size[0]))
    return split_tiles(y, sp.grid)


def run_backbone(model: Callable[[torch.Tensor], torch.Tensor], tiles: list[torch.Tensor],
                 chunk: int | None = None, fuse: bool = True) -> list[torch.Tensor]:
    """Run the model over every scale's tiles: one stack (chunked by `chunk`) when all tile sizes agree and
    `fuse`, else per scale. Returns one output per scale, in order."""
    def call(x: torch.Tensor) -> torch.Tensor:
        if chunk is None or x.shape[0] <= chunk:
            out = model(x)
        else:
            out = torch.cat([model(part) for part in x.split(chunk)], dim=0)
        if not isinstance(out, torch.Tensor):
            raise ConfigError("the model must return a tensor", given=type(out).__name__,
                              expected="(B, N, C) for bnc or (B, C, H, W) for bchw",
                              fix="wrap it, e.g. lambda x: model(x).last_hidden_state")
        return out

    same = len({tuple(t.shape[1:]) for t in tiles}) == 1
    if fuse and same and len(tiles) > 1:
        out = call(torch.cat(tiles, dim=0))
        return list(out.split([t.shape[0] for t in tiles], dim=0))
    return [call(t) for t in tiles]


def tokens_to_map(tokens: torch.Tensor) -> torch.Tensor:
    """(B, N, C) row-major tokens -> (B, C, s, s) with s = sqrt(N); a non-square N is an error."""
    B, N, C = tokens.shape
    s = math.isqrt(N)
    if s * s != N:
        raise ConfigError("the backbone's spatial token count is not a square", given=N,
                          expected="N = s*s tokens after the prefix tokens",
                          fix="set num_prefix_token to the number of CLS/register tokens the model returns")
    return tokens.transpose(1, 2).reshape(B, C, s, s)


def multiscale_forward(
    model: Callable[[torch.Tensor], torch.Tensor],
    input: torch.Tensor,
    scales: Sequence[float] | None = None,
    img_sizes: Sequence[Size] | None = None,
    max_split_size: int | None = None,
    split_mode: str = "resize",
    resize_output_to_idx: int = 0,
    num_prefix_token: int = 0,
    output_shape: str = "bnc",
    split_forward: bool = False,
    *,
    merge: str = "concat",
    antialias: bool = False,
    max_batch: int | None = None,
    fuse: bool = True,
) -> torch.Tensor | list[torch.Tensor]:
    """Multi-scale features of `input` (B, C, H, W); same arguments and results as the reference `forward`.

    Beyond the reference:
      merge="none"   returns one tensor per scale (its stitched map, prefix tokens in front for bnc)
      antialias=True antialiases bicubic downscaling (the reference never does)
      max_batch=N    runs the backbone on at most N tiles per call (memory bound); split_forward=True means N=B
      fuse=True      one backbone call over the tiles of all scales when their sizes agree (same output)
    """
    if not isinstance(input, torch.Tensor) or input.dim() != 4:
        raise ConfigError("input must be a 4-D image batch", given=getattr(input, "shape", type(input).__name__),
                          expected="(B, C, H, W)", fix="add a batch axis with x.unsqueeze(0)")
    if output_shape not in OUTPUT_SHAPES:
        raise ConfigError("output_shape is not known", given=output_shape, expected="'bnc' or 'bchw'",
                          fix="use 'bnc' for ViTs (B, N, C) and 'bchw' for ConvNets (B, C, H, W)")
    if not _is_int(num_prefix_token) or num_prefix_token < 0:
        raise ConfigError("num_prefix_token must be an int >= 0", given=num_prefix_token,
                          fix="pass the number of CLS/register tokens the model returns first (0 if none)")
    if output_shape == "bchw" and num_prefix_token:
        raise ConfigError("bchw output has no prefix tokens", given=num_prefix_token, expected="0",
                          fix="use output_shape='bnc' for ViTs with CLS tokens, or num_prefix_token=0")
    if merge not in MERGES:
        raise ConfigError("merge is not known", given=merge, expected="'concat' or 'none'",
                          fix="use merge='concat' (the reference) or 'none' (one map per scale)")
    if max_batch is not None and (not _is_int(max_batch) or max_batch <= 0):
        raise ConfigError("max_batch must be a positive int", given=max_batch, fix="pass e.g. max_batch=64 or None")

    b = input.shape[0]
    plan = plan_multiscale(tuple(input.shape[-2:]), scales, img_sizes, max_split_size, split_mode)
    n = len(plan.scales)
    if merge == "concat" and not -n <= resize_output_to_idx < n:
        raise ConfigError("resize_output_to_idx is out of range", given=resize_output_to_idx,
                          expected=f"an index into the {n} scales ({-n}..{n - 1})",
                          fix="use 0 for the first scale's grid or -1 for the last")

    tiles = [cut_scale(input, sp, split_mode, antialias) for sp in plan.scales]
    chunk = max_batch if max_batch is not None else (b if split_forward else None)
    outs = run_backbone(model, tiles, chunk=chunk, fuse=fuse)

    maps, prefixes = [], []
    for sp, out in zip(plan.scales, outs):
        if output_shape == "bnc":
            if out.dim() != 3:
                raise ConfigError("the model's output does not match output_shape='bnc'", given=tuple(out.shape),
                                  expected="(B, N, C)", fix="use output_shape='bchw' for ConvNets")
            if num_prefix_token:
                # mean of the prefix tokens over this scale's tiles
                prefixes.append(out[:, :num_prefix_token].reshape(sp.num_tiles, b, num_prefix_token, -1).mean(dim=0))
            fmap = tokens_to_map(out[:, num_prefix_token:])
        else:
            if out.dim() != 4:
                raise ConfigError("the model's output does not match output_shape='bchw'", given=tuple(out.shape),
                                  expected="(B, C, H, W)", fix="use output_shape='bnc' for ViTs")
            fmap = out
        fmap = merge_tiles(fmap, sp.grid)
        if split_mode == "pad" and plan.branch == "any_shape":
            ch, cw = _pad_crop_size(sp, tuple(fmap.shape[-2:]))
            fmap = fmap[:, :, :ch, :cw]
        maps.append(fmap)

    def finish(fmap: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
        if output_shape == "bchw":
            return fmap
        tokens = fmap.flatten(2).transpose(1, 2)
        return tokens if prefix is None else torch.cat([prefix, tokens], dim=1)

    if merge == "none":
        return [finish(m, prefixes[i] if prefixes else None) for i, m in enumerate(maps)]
    size = tuple(maps[resize_output_to_idx].shape[-2:])
    out = torch.cat([area_resize(m, size) for m in maps], dim=1)
    return finish(out, torch.cat(prefixes, dim=-1) if prefixes else None)
