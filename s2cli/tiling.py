"""S² tensor math: plan each scale's tiles, cut them, run the backbone on all of them, stitch, pool, concat. No I/O.

`multiscale_forward` is a drop-in replacement for the reference `s2wrapper.forward` (Shi et al., ECCV 2024):
square inputs follow the reference master branch, non-square inputs, (h, w) sizes and `split_mode="pad"`
follow its any-shape branch (with its `scales=` TypeError fixed). See docs/reference.md.
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
    plan: S2Plan | None = None,
) -> torch.Tensor | list[torch.Tensor]:
    """Multi-scale features of `input` (B, C, H, W); same arguments and results as the reference `forward`.

    Beyond the reference:
      merge="none"   returns one tensor per scale (its stitched map, prefix tokens in front for bnc)
      antialias=True antialiases bicubic downscaling (the reference never does)
      max_batch=N    runs the backbone on at most N tiles per call (memory bound); split_forward=True means N=B
      fuse=True      one backbone call over the tiles of all scales when their sizes agree (same output)
      plan=S2Plan    the tiles already planned for the input's size (`plan_multiscale` with these arguments, as a
                     run plans each image once); None: planned here
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
    if plan is None:
        plan = plan_multiscale(tuple(input.shape[-2:]), scales, img_sizes, max_split_size, split_mode)
    elif tuple(plan.input_hw) != tuple(input.shape[-2:]) or plan.split_mode != split_mode:
        raise ConfigError("the plan given is not the input's", given=(tuple(plan.input_hw), plan.split_mode),
                          expected=(tuple(input.shape[-2:]), split_mode),
                          fix="pass plan=plan_multiscale(input.shape[-2:], ...) with the same arguments, or no plan")
    n = len(plan.scales)
    if merge == "concat" and not -n <= resize_output_to_idx < n:
        raise ConfigError("resize_output_to_idx is out of range", given=resize_output_to_idx,
                          expected=f"an index into the {n} scales ({-n}..{n - 1})",
                          fix="use 0 for the first scale's grid or -1 for the last")

    chunk = max_batch if max_batch is not None else (b if split_forward else None)
    asm = _Assembler(plan, b, num_prefix_token, output_shape, merge, resize_output_to_idx)
    same = len({s.tile for s in plan.scales}) == 1
    streams = [list(range(n))] if fuse and same else [[i] for i in range(n)]
    for stream in streams:
        _run_stream(model, input, plan, stream, chunk, asm, antialias)
    return asm.result()


def scale_image(x: torch.Tensor, sp: ScalePlan, split_mode: str, antialias: bool = False) -> torch.Tensor:
    """Image batch at input size -> this scale's image on its canvas (a whole number of tiles), (B, C, *canvas)."""
    y = resize_image(x, sp.size, antialias)
    if sp.canvas != sp.size:
        if split_mode == "resize":
            y = resize_image(y, sp.canvas, antialias)
        else:  # zero padding bottom/right, in normalized tensor space
            y = F.pad(y, (0, sp.canvas[1] - sp.size[1], 0, sp.canvas[0] - sp.size[0]))
    return y


def _run_stream(model: Callable[[torch.Tensor], torch.Tensor], input: torch.Tensor, plan: S2Plan,
                stream: list[int], chunk: int | None, asm: "_Assembler", antialias: bool) -> None:
    """Run the backbone over the tiles of the scales in `stream`, stacked scale by scale, tile-major (batch index
    (row * n_cols + col) * B + b within a scale), in calls of at most `chunk` tiles (one call if None).

    Memory stays lean: a call's tiles are cut when the call is made, from the image of their scale, which is
    resized when its first tile is needed and dropped after its last; each call's output goes straight to the
    assembler and is dropped. Cutting a whole stack first and splitting it gives the same calls, so the output does
    not depend on how the tiles are produced, only on `chunk`."""
    b = input.shape[0]
    starts, total = [], 0
    for i in stream:
        starts.append(total)
        total += plan.scales[i].num_tiles * b
    step = chunk or total
    images: dict[int, torch.Tensor] = {}
    for a in range(0, total, step):
        e = min(a + step, total)
        pieces = []  # (scale, tile, b0, b1, row in this call)
        for i, off in zip(stream, starts):
            lo, hi = max(a, off), min(e, off + plan.scales[i].num_tiles * b)
            for t in range((lo - off) // b, (hi - off - 1) // b + 1) if lo < hi else ():
                b0, b1 = max(lo - off - t * b, 0), min(hi - off - t * b, b)
                pieces.append((i, t, b0, b1, off + t * b + b0 - a))
        x = None
        for i, t, b0, b1, row in pieces:
            sp = plan.scales[i]
            if i not in images:
                images[i] = scale_image(input, sp, plan.split_mode, antialias)
            (r, c), (th, tw) = divmod(t, sp.grid[1]), sp.tile
            tile = images[i][b0:b1, :, r * th:(r + 1) * th, c * tw:(c + 1) * tw]
            if len(pieces) == 1 and tile.is_contiguous():
                x = tile  # the call is exactly one whole image (a 1x1 grid): no copy
            else:
                if x is None:
                    x = torch.empty((e - a, *tile.shape[1:]), dtype=tile.dtype, device=tile.device)
                x[row:row + b1 - b0].copy_(tile)
            if t == sp.num_tiles - 1 and b1 == b:
                del images[i]  # its last tile is cut
        out = model(x)
        del x
        if not isinstance(out, torch.Tensor):
            raise ConfigError("the model must return a tensor", given=type(out).__name__,
                              expected="(B, N, C) for bnc or (B, C, H, W) for bchw",
                              fix="wrap it, e.g. lambda x: model(x).last_hidden_state")
        for i, t, b0, b1, row in pieces:
            asm.put(i, t, b0, b1, out[row:row + b1 - b0])
        del out


class _Assembler:
    """Takes each call's tile outputs as they come and builds the result in place.

    Each scale's tiles are stitched row-major (cropped top-left in pad mode). With merge="concat" the output
    (bnc: (B, P + h*w, C*S); bchw: (B, C*S, h, w)) is allocated once and every scale lands in its channel slot:
    a scale whose stitched grid is the output grid is written there tile by tile; a scale whose grid is an
    integer multiple of it, with tiles aligned to the pooling windows, is area-pooled tile by tile (the same
    windows, so the same numbers as pooling the stitched map); any other scale is stitched into its own map,
    pooled when its last tile arrives, and dropped. Prefix tokens are kept per tile (small) and averaged over the
    scale's tiles when it is complete."""

    def __init__(self, plan: S2Plan, b: int, num_prefix: int, output_shape: str, merge: str, idx: int):
        self.plan, self.b, self.P, self.shape, self.merge = plan, b, num_prefix, output_shape, merge
        self.idx = idx % len(plan.scales)
        n = len(plan.scales)
        self.done = [0] * n  # tiles received (counting each image)
        self.mode: list[str | None] = [None] * n  # "direct", "pool" (tile by tile) or "map"
        self.maps: list[torch.Tensor | None] = [None] * n
        self.prefix: list[torch.Tensor | None] = [None] * n
        self.prefix_mean: list[torch.Tensor | None] = [None] * n
        self.out: torch.Tensor | None = None  # bnc: (B, P + h*w, C*S); bchw: (B, C*S, h, w)
        self.grid: tuple[int, int] | None = None
        self.channels: int | None = None

    def _tile_map(self, o: torch.Tensor) -> torch.Tensor:
        """One call's output rows -> (prefix tokens or None, spatial map (k, C, fh, fw))."""
        if self.shape == "bnc":
            if o.dim() != 3:
                raise ConfigError("the model's output does not match output_shape='bnc'", given=tuple(o.shape),
                                  expected="(B, N, C)", fix="use output_shape='bchw' for ConvNets")
            return o[:, :self.P], tokens_to_map(o[:, self.P:])
        if o.dim() != 4:
            raise ConfigError("the model's output does not match output_shape='bchw'", given=tuple(o.shape),
                              expected="(B, C, H, W)", fix="use output_shape='bnc' for ViTs")
        return None, o

    def _slot(self, i: int) -> torch.Tensor:
        """Scale i's channels in the output as a (B, C, h, w) view."""
        assert self.out is not None and self.channels is not None
        cs = slice(i * self.channels, (i + 1) * self.channels)
        if self.shape == "bchw":
            return self.out[:, cs]
        return self.out[:, self.P:, cs].unflatten(1, self.grid).permute(0, 3, 1, 2)

    def _start_output(self, fmap: torch.Tensor, fhw: tuple[int, int]) -> None:
        self.grid = self.plan.feature_grid(self.idx, fhw)
        self.channels = fmap.shape[1]
        S, (h, w), C = len(self.plan.scales), self.grid, fmap.shape[1]
        shape = (self.b, C * S, h, w) if self.shape == "bchw" else (self.b, self.P + h * w, C * S)
        self.out = torch.empty(shape, dtype=fmap.dtype, device=fmap.device)
        for j, m in enumerate(self.maps):  # scales completed before the output grid was known
            if m is not None and self.done[j] == self.plan.scales[j].num_tiles * self.b:
                self._finish_scale(j)

    def _choose(self, i: int, fmap: torch.Tensor) -> None:
        sp, fhw = self.plan.scales[i], tuple(fmap.shape[-2:])
        if self.merge == "concat" and self.out is None and sp.tile == self.plan.scales[self.idx].tile:
            self._start_output(fmap, fhw)  # same tile size as the output's scale: same feature grid per tile
        full = (sp.grid[0] * fhw[0], sp.grid[1] * fhw[1])
        grid = self.plan.feature_grid(i, fhw)
        mode = "map"
        if self.out is not None:
            if fmap.shape[1] != self.channels:
                raise ConfigError("the model returned a different channel count at another scale",
                                  given=fmap.shape[1], expected=f"{self.channels} channels at every scale",
                                  fix="use a backbone whose feature width does not depend on the input size")
            oh, ow = self.grid
            if grid == self.grid:
                mode = "direct"
            elif grid == full and grid[0] % oh == 0 and grid[1] % ow == 0:
                rh, rw = grid[0] // oh, grid[1] // ow
                # tiles must hold whole pooling windows; a 1x1 pooled tile would take adaptive pooling's mean path
                if fhw[0] % rh == 0 and fhw[1] % rw == 0 and (fhw[0] // rh) * (fhw[1] // rw) > 1:
                    mode = "pool"
        self.mode[i] = mode
        if mode == "map":
            self.maps[i] = torch.empty((self.b, fmap.shape[1], *grid), dtype=fmap.dtype, device=fmap.device)

    def put(self, i: int, t: int, b0: int, b1: int, o: torch.Tensor) -> None:
        """Rows b0:b1 of tile t of scale i."""
        pre, fmap = self._tile_map(o)
        if self.mode[i] is None:
            self._choose(i, fmap)
        sp, (fh, fw) = self.plan.scales[i], fmap.shape[-2:]
        if self.P:
            if self.prefix[i] is None:
                # one spare token per row keeps the rows apart in memory, as they are in the backbone's output: the
                # mean then reduces the same layout and gives the same bits as when every output was kept
                rows, (p, c) = sp.num_tiles * self.b, pre.shape[1:]
                self.prefix[i] = torch.empty((rows, p + 1, c), dtype=pre.dtype, device=pre.device)[:, :p]
            self.prefix[i][t * self.b + b0:t * self.b + b1] = pre
        r, c = divmod(t, sp.grid[1])
        mode = self.mode[i]
        if mode == "pool":
            ph, pw = self.grid[0] // sp.grid[0], self.grid[1] // sp.grid[1]  # one tile's share of the output
            pooled = area_resize(fmap.contiguous(), (ph, pw))
            self._slot(i)[b0:b1, :, r * ph:(r + 1) * ph, c * pw:(c + 1) * pw] = pooled
        else:
            dst = self._slot(i) if mode == "direct" else self.maps[i]
            h, w = dst.shape[-2:]
            r0, c0 = r * fh, c * fw
            r1, c1 = min(r0 + fh, h), min(c0 + fw, w)  # pad mode crops the stitched map top-left
            if r0 < r1 and c0 < c1:
                dst[b0:b1, :, r0:r1, c0:c1] = fmap[:, :, :r1 - r0, :c1 - c0]
        self.done[i] += b1 - b0
        if self.done[i] == sp.num_tiles * self.b:
            self._finish_scale(i)

    def _finish_scale(self, i: int) -> None:
        sp = self.plan.scales[i]
        if self.P and self.prefix[i] is not None and self.prefix_mean[i] is None:
            # mean of the prefix tokens over this scale's tiles
            pre = self.prefix[i]
            self.prefix_mean[i] = pre.reshape(sp.num_tiles, self.b, *pre.shape[1:]).mean(dim=0)
            self.prefix[i] = None
        if self.merge == "none" or self.out is None:
            return  # kept: returned as is, or pooled once the output grid is known
        if self.P:
            self.out[:, :self.P, i * self.channels:(i + 1) * self.channels] = self.prefix_mean[i]
        if self.mode[i] == "map":
            self._slot(i).copy_(area_resize(self.maps[i], self.grid))
            self.maps[i] = None

    def result(self) -> torch.Tensor | list[torch.Tensor]:
        if self.merge == "none":
            res = []
            for m, p in zip(self.maps, self.prefix_mean):
                if self.shape == "bnc":
                    m = m.flatten(2).transpose(1, 2)
                    m = m if p is None else torch.cat([p, m], dim=1)
                res.append(m)
            return res
        assert self.out is not None
        return self.out
