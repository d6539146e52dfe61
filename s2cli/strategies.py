"""Strategies: the registry (`STRATEGIES`, one record per strategy, S² included) and the dynamic-resolution math
beside the S² engine: a planner per strategy (image size + settings -> the views to render and the tiles or strided
sub-images to cut from each) and a merger (the backbone's features of those inputs -> the image's feature maps).
No I/O; torch is imported only when features are computed. The facts each planner matches are in docs/.

  s2          S²-Wrapper (tiling.py): the image fitted to the largest scale, every scale tiled, stitched, pooled

  dynamic-s2  NVILA: every scale but the last squashed to k x k tiles, the last scale's grid by the InternVL rule
  anyres      LLaVA-NeXT / OneVision: best pinpoint, resize + centered black pad, squashed base image first
  internvl    InternVL 1.5: min..max tiles of S by the InternVL rule, squashed thumbnail last
  native      Qwen2-VL: smart_resize to multiples of a factor, one input of any size
  dual        INF-LLaVA: local tiles and strided sub-images of one n*S image, recombined into two maps
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Sequence

from ._lazy import F, torch
from .errors import ConfigError
from .items import StoredItem
from .pixels import fit_size, fit_to_array, render_views, to_uint8_array
from .tiling import S2Plan, area_resize, plan_multiscale

# LLaVA-NeXT's grid pinpoints for CLIP-336, (h, w); for another tile the same grids of that tile are the default
LLAVA_NEXT_GRIDS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))
LLAVA_NEXT_PINPOINTS = tuple((336 * r, 336 * c) for r, c in LLAVA_NEXT_GRIDS)
# Qwen2-VL's image processor defaults (transformers Qwen2VLImageProcessor): 56*56 and 28*28*1280 pixels
QWEN2_MIN_PIXELS = 56 * 56
QWEN2_MAX_PIXELS = 28 * 28 * 1280


# ---- the published planners, as pure functions on sizes -------------------------------------------------------
def internvl_ratios(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """InternVL's candidate grids (cols i, rows j) with min_num <= i*j <= max_num, built and sorted exactly as
    `dynamic_preprocess` does (a set sorted by i*j; CPython's order of small-int tuples in a set is fixed)."""
    return list(_internvl_ratios(min_num, max_num))


@functools.lru_cache(maxsize=64)  # made once per (min, max), not once per image
def _internvl_ratios(min_num: int, max_num: int) -> tuple[tuple[int, int], ...]:
    target = set((i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                 if min_num <= i * j <= max_num)
    return tuple(sorted(target, key=lambda x: x[0] * x[1]))


def internvl_grid(width: int, height: int, min_num: int, max_num: int, tile: int) -> tuple[int, int]:
    """InternVL's `find_closest_aspect_ratio` over `internvl_ratios`: (cols, rows). The smallest |W/H - i/j|
    wins; on an exact tie the later grid wins only if W*H > 0.5 * tile² * i*j."""
    aspect = width / height
    best_diff, best = float("inf"), (1, 1)
    area = width * height
    for i, j in internvl_ratios(min_num, max_num):
        diff = abs(aspect - i / j)
        if diff < best_diff:
            best_diff, best = diff, (i, j)
        elif diff == best_diff and area > 0.5 * tile * tile * i * j:
            best = (i, j)
    return best


def select_best_resolution(orig_hw: tuple[int, int], candidates: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """LLaVA-NeXT: the (h, w) candidate keeping the most original pixels (min(int(W*s)*int(H*s), W*H) with
    s = min(w/W, h/H)), then wasting the fewest; the first candidate wins exact ties."""
    H, W = orig_hw
    best, best_eff, best_waste = None, -1, float("inf")
    for h, w in candidates:
        s = min(w / W, h / H)
        eff = min(int(W * s) * int(H * s), W * H)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (h, w), eff, waste
    return best  # type: ignore[return-value]


def anyres_resize_hw(orig_hw: tuple[int, int], target_hw: tuple[int, int]) -> tuple[int, int]:
    """LLaVA-NeXT's `get_patch_output_size`: the aspect-kept size inside target (ceil, clamped)."""
    H, W = orig_hw
    th, tw = target_hw
    sw, sh = tw / W, th / H
    if sw < sh:
        return min(math.ceil(H * sw), th), tw
    return th, min(math.ceil(W * sh), tw)


def unpad_box(feat_hw: tuple[int, int], orig_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """LLaVA-NeXT's `unpad_image` on a stitched (h, w) map: (top, bottom, left, right) rows/cols kept."""
    ch, cw = feat_hw
    H, W = orig_hw
    if W / H > cw / ch:
        new_h = int(round(H * (cw / W), 7))
        pad = (ch - new_h) // 2
        return pad, ch - pad, 0, cw
    new_w = int(round(W * (ch / H), 7))
    pad = (cw - new_w) // 2
    return 0, ch, pad, cw - pad


def anyres_max_hw(hw: tuple[int, int], max_tiles: int, unit: int) -> tuple[int, int] | None:
    """OneVision `anyres_max_N`: the bilinear target of an unpadded (h, w) map when sqrt(h*w / (N*unit²)) > 1.1,
    else None (kept)."""
    h, w = hw
    times = math.sqrt(h * w / (max_tiles * unit ** 2))
    if times > 1.1:
        return int(h // times), int(w // times)
    return None


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = QWEN2_MIN_PIXELS,
                 max_pixels: int = QWEN2_MAX_PIXELS) -> tuple[int, int]:
    """Qwen2-VL's `smart_resize` (transformers >= 4.53): sides multiples of `factor`, pixels within
    [min_pixels, max_pixels], aspect ratio kept as well as that allows. A side below the factor rounds to 0 and is
    lifted by the min_pixels branch (transformers >= 4.53 no longer raises there)."""
    if max(height, width) / min(height, width) > 200:
        raise ConfigError("the image's aspect ratio is above 200, which smart_resize refuses", given=(height, width),
                          expected="max(h, w) / min(h, w) <= 200", fix="crop the image, or use --strategy anyres")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# ---- settings and plans ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StrategyCfg:
    """A strategy's resolved settings (saved with the output)."""

    name: str
    tile: int  # S: the backbone's input side
    img_sizes: tuple[int, ...] = ()  # dynamic-s2: the scales; dual: (n*S,)
    min_tiles: int = 1
    max_tiles: int = 12
    thumbnail: bool = False
    grid_pinpoints: tuple[tuple[int, int], ...] = ()
    anyres_max: int | None = None
    factor: int = 28
    min_pixels: int = QWEN2_MIN_PIXELS
    max_pixels: int = QWEN2_MAX_PIXELS
    fit: str = "squash"  # dual: how the image is brought to n*S x n*S

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["grid_pinpoints"] = [list(p) for p in self.grid_pinpoints]
        d["img_sizes"] = list(self.img_sizes)
        return d


@dataclass(frozen=True)
class View:
    """One rendering of the image and the backbone inputs cut from it.

    render: "squash" (resize to `canvas`), "letterbox" (resize to `resize`, pad black centered to `canvas`,
            odd pixel bottom/right) or "fit" (the --fit mode to `canvas`, square).
    cut:    "tiles" (boxes of `tile`, row-major) or "strided" (x[:, a::rows, b::cols], index a*cols + b).
    """

    name: str
    render: str
    resize: tuple[int, int]
    canvas: tuple[int, int]
    grid: tuple[int, int]  # (rows, cols)
    tile: tuple[int, int]
    cut: str = "tiles"

    @property
    def num_inputs(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def pad(self) -> tuple[int, int]:
        """(top, left) offset of the resized image on the canvas (letterbox)."""
        return (self.canvas[0] - self.resize[0]) // 2, (self.canvas[1] - self.resize[1]) // 2

    def boxes(self) -> list[tuple[int, int, int, int]]:
        """(top, left, bottom, right) of each input on the canvas, in input order (strided: the whole canvas)."""
        th, tw = self.tile
        if self.cut == "strided":
            return [(0, 0, self.canvas[0], self.canvas[1])] * self.num_inputs
        return [(r * th, c * tw, (r + 1) * th, (c + 1) * tw) for r in range(self.grid[0]) for c in range(self.grid[1])]


@dataclass(frozen=True)
class StrategyPlan:
    """Everything a strategy does with one image of `input_hw` (h, w), before any pixel is read."""

    strategy: str
    input_hw: tuple[int, int]
    views: tuple[View, ...]
    same_source: bool = False  # dual: every view is cut from the first view's pixels

    @property
    def num_tiles(self) -> int:
        return sum(v.num_inputs for v in self.views)

    @property
    def grids(self) -> list[list[int]]:
        return [list(v.grid) for v in self.views]

    def view(self, name: str) -> View | None:
        return next((v for v in self.views if v.name == name), None)


@dataclass(frozen=True)
class OutMap:
    """One map of the output: `name`, its token grid (h, w) and where its tokens start after the prefix."""

    name: str
    hw: tuple[int, int]
    offset: int


@dataclass(frozen=True)
class OutLayout:
    """The output of one image: prefix tokens, then each map's tokens row-major, `channels` wide; channel groups
    name what each C-wide slice holds (scales for dynamic-s2, local/interleaved for dual)."""

    maps: tuple[OutMap, ...]
    prefix: int
    channels: int
    groups: tuple[str, ...]

    @property
    def tokens(self) -> int:
        return self.prefix + sum(m.hw[0] * m.hw[1] for m in self.maps)

    @property
    def grid_hw(self) -> tuple[int, int]:
        """The main map's grid (the largest map)."""
        return max((m.hw for m in self.maps), key=lambda hw: hw[0] * hw[1])

    def to_dict(self) -> dict[str, Any]:
        return {"maps": [{"name": m.name, "hw": list(m.hw), "offset": m.offset} for m in self.maps],
                "prefix": self.prefix, "channels": self.channels, "groups": list(self.groups)}


def plan_strategy(cfg: StrategyCfg, input_hw: tuple[int, int]) -> StrategyPlan:
    """The plan of one image (h, w) under `cfg`."""
    h, w = int(input_hw[0]), int(input_hw[1])
    if h <= 0 or w <= 0:
        raise ConfigError("an image has no pixels", given=(h, w), fix="remove the empty image")
    return STRATEGIES[cfg.name].planner(cfg, (h, w))  # type: ignore[attr-defined]


def _sq(n: int) -> tuple[int, int]:
    return (n, n)


# ---- mergers: per view (prefix (n, P, C) | None, maps (n, C, gh, gw)) -> output maps (1, C', h, w) -------------
def _stitch(maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(rows*cols, C, h, w) row-major -> (1, C, rows*h, cols*w)."""
    n, C, h, w = maps.shape
    r, c = grid
    return maps.reshape(r, c, C, h, w).permute(2, 0, 3, 1, 4).reshape(1, C, r * h, c * w)


def _interleave(maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Strided sub-images' maps back to one map: out[:, a::rows, b::cols] = maps[a*cols + b]."""
    n, C, h, w = maps.shape
    r, c = grid
    return maps.reshape(r, c, C, h, w).permute(2, 3, 0, 4, 1).reshape(1, C, h * r, w * c)


def _layout_dynamic_s2(cfg: StrategyCfg, plan: StrategyPlan, fhw: tuple[int, int]):
    last = plan.views[-1]
    return [("merged", (last.grid[0] * fhw[0], last.grid[1] * fhw[1]))]


def _merge_dynamic_s2(cfg, plan, per_view, orig_hw):
    maps = [_stitch(m, v.grid) for v, m in zip(plan.views, per_view)]
    size = tuple(maps[-1].shape[-2:])
    return [torch.cat([area_resize(m, size) for m in maps], dim=1)]


def _anyres_grid_hw(plan: StrategyPlan, cfg: StrategyCfg, fhw: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int, int, int], tuple[int, int] | None]:
    g = plan.view("grid")
    full = (g.grid[0] * fhw[0], g.grid[1] * fhw[1])  # type: ignore[union-attr]
    top, bottom, left, right = unpad_box(full, plan.input_hw)
    hw = (bottom - top, right - left)
    reduced = anyres_max_hw(hw, cfg.anyres_max, fhw[0]) if cfg.anyres_max else None
    return hw, (top, bottom, left, right), reduced


def _layout_anyres(cfg, plan, fhw):
    hw, _, reduced = _anyres_grid_hw(plan, cfg, fhw)
    return [("base", fhw), ("grid", reduced or hw)]


def _merge_anyres(cfg, plan, per_view, orig_hw):
    base, grid = per_view
    fhw = tuple(base.shape[-2:])
    _, (top, bottom, left, right), reduced = _anyres_grid_hw(plan, cfg, fhw)
    m = _stitch(grid, plan.view("grid").grid)[:, :, top:bottom, left:right]  # type: ignore[union-attr]
    if reduced is not None:
        m = F.interpolate(m.to(torch.float32), size=reduced, mode="bilinear").to(m.dtype)
    return [base, m]


def _layout_internvl(cfg, plan, fhw):
    g = plan.view("grid")
    out = [("grid", (g.grid[0] * fhw[0], g.grid[1] * fhw[1]))]  # type: ignore[union-attr]
    if plan.view("thumbnail") is not None:
        out.append(("thumbnail", fhw))
    return out


def _merge_internvl(cfg, plan, per_view, orig_hw):
    out = [_stitch(per_view[0], plan.views[0].grid)]
    if len(per_view) > 1:
        out.append(per_view[1])
    return out


def _layout_native(cfg, plan, fhw):
    return [("image", fhw)]


def _merge_native(cfg, plan, per_view, orig_hw):
    return [per_view[0]]


def _layout_dual(cfg, plan, fhw):
    g = plan.views[0].grid
    return [("dual", (g[0] * fhw[0], g[1] * fhw[1]))]


def _merge_dual(cfg, plan, per_view, orig_hw):
    local, strided = per_view
    return [torch.cat([_stitch(local, plan.views[0].grid), _interleave(strided, plan.views[1].grid)], dim=1)]


# ---- planners ------------------------------------------------------------------------------------------------
def _plan_dynamic_s2(cfg: StrategyCfg, hw: tuple[int, int]) -> StrategyPlan:
    S, sizes = cfg.tile, cfg.img_sizes
    views = []
    for i, size in enumerate(sizes[:-1]):
        k = size // sizes[0]
        views.append(View(f"scale{i}", "squash", _sq(S * k), _sq(S * k), (k, k), _sq(S)))
    min_num = (sizes[-1] // sizes[0]) ** 2
    cols, rows = internvl_grid(hw[1], hw[0], min_num, cfg.max_tiles, S)
    views.append(View(f"scale{len(sizes) - 1}", "squash", (S * rows, S * cols), (S * rows, S * cols), (rows, cols), _sq(S)))
    return StrategyPlan("dynamic-s2", hw, tuple(views))


def _plan_anyres(cfg: StrategyCfg, hw: tuple[int, int]) -> StrategyPlan:
    S = cfg.tile
    best = select_best_resolution(hw, cfg.grid_pinpoints)
    resized = anyres_resize_hw(hw, best)
    base = View("base", "squash", _sq(S), _sq(S), (1, 1), _sq(S))
    grid = View("grid", "letterbox", resized, best, (best[0] // S, best[1] // S), _sq(S))
    return StrategyPlan("anyres", hw, (base, grid))


def _plan_internvl(cfg: StrategyCfg, hw: tuple[int, int]) -> StrategyPlan:
    S = cfg.tile
    cols, rows = internvl_grid(hw[1], hw[0], cfg.min_tiles, cfg.max_tiles, S)
    views = [View("grid", "squash", (S * rows, S * cols), (S * rows, S * cols), (rows, cols), _sq(S))]
    if cfg.thumbnail and rows * cols != 1:
        views.append(View("thumbnail", "squash", _sq(S), _sq(S), (1, 1), _sq(S)))
    return StrategyPlan("internvl", hw, tuple(views))


def _plan_native(cfg: StrategyCfg, hw: tuple[int, int]) -> StrategyPlan:
    size = smart_resize(hw[0], hw[1], cfg.factor, cfg.min_pixels, cfg.max_pixels)
    return StrategyPlan("native", hw, (View("image", "squash", size, size, (1, 1), size),))


def _plan_dual(cfg: StrategyCfg, hw: tuple[int, int]) -> StrategyPlan:
    S, side = cfg.tile, cfg.img_sizes[-1]
    n = side // S
    local = View("local", "fit", _sq(side), _sq(side), (n, n), _sq(S))
    strided = View("strided", "fit", _sq(side), _sq(side), (n, n), _sq(S), cut="strided")
    return StrategyPlan("dual", hw, (local, strided), same_source=True)


# ---- output layout and merge ---------------------------------------------------------------------------------
def out_layout(cfg: StrategyCfg, plan: StrategyPlan, feat_hw: Callable[[tuple[int, int]], tuple[int, int]],
               channels: int, prefix: int) -> OutLayout:
    """The image's output: map names and token grids, for a backbone mapping a tile (h, w) to `feat_hw(tile)`."""
    fhw = feat_hw(plan.views[-1].tile) if cfg.name == "native" else feat_hw(_sq(cfg.tile))
    maps, off = [], 0
    record: ViewStrategy = STRATEGIES[cfg.name]  # type: ignore[assignment]
    for name, hw in record.layout(cfg, plan, fhw):
        maps.append(OutMap(name, tuple(hw), off))
        off += hw[0] * hw[1]
    groups = record.groups(cfg)
    return OutLayout(tuple(maps), prefix, channels * len(groups), groups)


def cut_view(x: torch.Tensor, view: View) -> torch.Tensor:
    """A rendered view (C, H, W) -> its backbone inputs (n, C, th, tw) in input order."""
    C, H, W = x.shape
    r, c = view.grid
    if view.cut == "strided":
        return torch.stack([x[:, a::r, b::c] for a in range(r) for b in range(c)])
    th, tw = view.tile
    return x.reshape(C, r, th, c, tw).permute(1, 3, 0, 2, 4).reshape(r * c, C, th, tw)


def outputs_to_maps(out: torch.Tensor, num_prefix: int, output_shape: str,
                    fhw: tuple[int, int]) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The backbone's output for n inputs -> (prefix tokens (n, P, C) or None, maps (n, C, gh, gw))."""
    if output_shape == "bchw":
        return None, out
    n, N, C = out.shape
    gh, gw = fhw
    if N - num_prefix != gh * gw:
        raise ConfigError("the backbone returned a token count that does not match its patch grid",
                          given=N, expected=f"{num_prefix} prefix + {gh}x{gw} tokens",
                          fix="check the model's patch size and prefix tokens (`s2 models`)")
    pre = out[:, :num_prefix] if num_prefix else None
    return pre, out[:, num_prefix:].transpose(1, 2).reshape(n, C, gh, gw)


def merge(cfg: StrategyCfg, plan: StrategyPlan, per_view: list[tuple[torch.Tensor | None, torch.Tensor]],
          layout: OutLayout) -> torch.Tensor:
    """Per view (prefix, maps) of one image -> its output tokens (prefix + Σ h*w, C'). Prefix tokens are the mean
    over the inputs that feed each channel group (per scale for dynamic-s2, per perspective for dual, over all
    inputs otherwise), concatenated like S²'s."""
    maps = STRATEGIES[cfg.name].merger(cfg, plan, [m for _, m in per_view], plan.input_hw)  # type: ignore[attr-defined]
    for m, om in zip(maps, layout.maps):
        if tuple(m.shape[-2:]) != om.hw or m.shape[1] != layout.channels:
            raise ConfigError("a merged map does not match the planned layout", given=tuple(m.shape),
                              expected=f"(1, {layout.channels}, {om.hw[0]}, {om.hw[1]})",
                              fix="report this: the backbone's feature grid differs from its config's patch size")
    tokens = torch.cat([m.flatten(2).transpose(1, 2)[0] for m in maps], dim=0)
    if not layout.prefix:
        return tokens
    pres = [p for p, _ in per_view]
    if len(layout.groups) == len(per_view):
        prefix = torch.cat([p.mean(dim=0) for p in pres], dim=-1)  # type: ignore[union-attr]
    else:
        prefix = torch.cat(pres, dim=0).mean(dim=0)  # type: ignore[arg-type]
    return torch.cat([prefix, tokens], dim=0)


def grouped_calls(model: Callable[[torch.Tensor], torch.Tensor], inputs: list[torch.Tensor],
                  chunk: int | None = None) -> list[torch.Tensor]:
    """Run the model on every input stack: stacks of one input size go through together (one call per size,
    split into calls of at most `chunk` inputs). Returns one output per stack, in order."""
    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, t in enumerate(inputs):
        by_size.setdefault(tuple(t.shape[1:]), []).append(i)
    outs: list[torch.Tensor | None] = [None] * len(inputs)
    for idx in by_size.values():
        x = torch.cat([inputs[i] for i in idx], dim=0)
        y = model(x) if chunk is None or x.shape[0] <= chunk else torch.cat([model(p) for p in x.split(chunk)], dim=0)
        if not isinstance(y, torch.Tensor):
            raise ConfigError("the model must return a tensor", given=type(y).__name__,
                              expected="(B, N, C) or (B, C, H, W)", fix="wrap it, e.g. lambda x: model(x).last_hidden_state")
        for i, part in zip(idx, y.split([inputs[i].shape[0] for i in idx], dim=0)):
            outs[i] = part
    return outs  # type: ignore[return-value]


# ---- settings: defaults from each strategy's source, checked before any weights load ---------------------------
@dataclass(frozen=True)
class StrategyArgs:
    """What the user set (None = not set)."""

    strategy: str = "s2"
    min_tiles: int | None = None
    max_tiles: int | None = None
    thumbnail: bool | None = None
    grid_pinpoints: tuple[tuple[int, int], ...] | None = None
    anyres_max: int | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    fit: str = "squash"
    img_sizes: tuple[int, ...] = ()
    set_fields: tuple[str, ...] = field(default=())  # the strategy and shape options set (by a flag or a recipe)
    set_by: dict[str, str] = field(default_factory=dict)  # option -> "flag" | "recipe"
    recipe: str | None = None
    flags: dict[str, str] = field(default_factory=dict)  # option -> its flag, from its declaration (config.py)

    def flag(self, name: str) -> str:
        """The option `name` as the user wrote it: its declared flag (a caller without declarations: --name)."""
        return self.flags.get(name, "--" + name.replace("_", "-"))


# the options of the S² engine and of the image's fit: a strategy honours those of them its record `uses`; any
# other one set (by a flag or a recipe) is refused, never ignored
SHAPE_OPTIONS = ("scales", "img_sizes", "max_split_size", "split_mode", "resize_output_to_idx", "antialias", "fit")


def parse_pinpoints(value: Any) -> tuple[tuple[int, int], ...] | None:
    """'336x672,672x336' or [[336, 672], "672x336"] -> ((336, 672), (672, 336)), (h, w) each."""
    if value is None:
        return None
    items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
    out = []
    for it in items:
        try:
            h, w = (int(v) for v in it.lower().split("x")) if isinstance(it, str) else (int(it[0]), int(it[1]))
        except (ValueError, TypeError, IndexError):
            raise ConfigError("a grid pinpoint is not HxW", given=it, expected="e.g. 336x672 (height x width)",
                              fix="pass --grid-pinpoints 336x672,672x336,672x672") from None
        out.append((h, w))
    if not out:
        raise ConfigError("--grid-pinpoints is empty", given=value, fix="pass e.g. --grid-pinpoints 336x672,672x336")
    return tuple(out)


def _positive(a: StrategyArgs, name: str) -> None:
    v = getattr(a, name)
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
        raise ConfigError(f"{a.flag(name)} must be a positive integer", given=v, fix=f"pass {a.flag(name)} 1 or more")


@dataclass(frozen=True)
class BackboneFacts:
    """What a strategy's settings depend on in the backbone: its tile (input side), patch, and whether it runs on
    inputs of any size (its family says: ConvNets, timm ViTs built with dynamic_img_size=True, DINOv2)."""

    tile: int
    patch: int
    any_size: bool
    name: str = ""  # the model, for messages


def _resolve_dynamic_s2(a: StrategyArgs, base: StrategyCfg, bb: BackboneFacts) -> StrategyCfg:
    sizes, tile = tuple(a.img_sizes), bb.tile
    if len(sizes) < 2 or any(s % sizes[0] or s < sizes[0] for s in sizes) or sizes[0] != tile:
        raise ConfigError("dynamic-s2 needs scales that are multiples of the first, the first equal to the tile",
                          given=list(sizes), expected=f"e.g. {tile},{2 * tile},{3 * tile} with --max-split-size {tile}",
                          fix=f"pass --img-sizes {tile},{2 * tile},{3 * tile}")
    min_num = (sizes[-1] // sizes[0]) ** 2
    max_tiles = a.max_tiles if a.max_tiles is not None else base.max_tiles
    if max_tiles < min_num:
        raise ConfigError(f"{a.flag('max_tiles')} is below the last scale's minimum grid", given=max_tiles,
                          expected=f">= (last // first)² = {min_num}",
                          fix=f"pass {a.flag('max_tiles')} {max(base.max_tiles, min_num)}")
    return replace(base, img_sizes=sizes, min_tiles=min_num, max_tiles=max_tiles)


def _resolve_anyres(a: StrategyArgs, base: StrategyCfg, bb: BackboneFacts) -> StrategyCfg:
    tile = bb.tile
    pins = a.grid_pinpoints or tuple((tile * r, tile * c) for r, c in LLAVA_NEXT_GRIDS)
    bad = [p for p in pins if p[0] % tile or p[1] % tile or min(p) <= 0]
    if bad:
        raise ConfigError("grid pinpoints must be positive multiples of the tile", given=bad,
                          expected=f"HxW with H and W multiples of {tile}",
                          fix=f"e.g. --grid-pinpoints {tile}x{2 * tile},{2 * tile}x{tile}")
    return replace(base, grid_pinpoints=tuple(pins), anyres_max=a.anyres_max)


def _resolve_internvl(a: StrategyArgs, base: StrategyCfg, bb: BackboneFacts) -> StrategyCfg:
    lo = a.min_tiles if a.min_tiles is not None else base.min_tiles
    hi = a.max_tiles if a.max_tiles is not None else base.max_tiles
    if lo > hi:
        raise ConfigError(f"{a.flag('min_tiles')} is above {a.flag('max_tiles')}", given=(lo, hi),
                          fix=f"pass e.g. {a.flag('min_tiles')} {base.min_tiles} {a.flag('max_tiles')} {base.max_tiles}")
    return replace(base, min_tiles=lo, max_tiles=hi, thumbnail=True if a.thumbnail is None else a.thumbnail)


def _resolve_native(a: StrategyArgs, base: StrategyCfg, bb: BackboneFacts) -> StrategyCfg:
    if not bb.any_size:
        raise ConfigError("--strategy native needs a backbone that accepts any input size, and this one has "
                          "a fixed position embedding", given=bb.name,
                          expected="a ConvNet, a timm ViT (built with dynamic_img_size=True) or DINOv2",
                          fix="use -m dinov2-l or -m timm:vit_base_patch16_224, or another --strategy")
    lo = a.min_pixels if a.min_pixels is not None else base.min_pixels
    hi = a.max_pixels if a.max_pixels is not None else base.max_pixels
    if lo > hi:
        raise ConfigError(f"{a.flag('min_pixels')} is above {a.flag('max_pixels')}", given=(lo, hi),
                          fix=f"e.g. {a.flag('min_pixels')} {base.min_pixels} {a.flag('max_pixels')} {base.max_pixels}")
    return replace(base, factor=2 * bb.patch, min_pixels=lo, max_pixels=hi)


def _resolve_dual(a: StrategyArgs, base: StrategyCfg, bb: BackboneFacts) -> StrategyCfg:
    tile, sizes = bb.tile, tuple(a.img_sizes)
    if a.fit == "keep":
        raise ConfigError("dual cuts a square image, and --fit keep keeps the aspect ratio", given=a.fit,
                          expected="crop | squash | pad", fix="pass --fit crop (or squash, pad)")
    side = max(sizes) if sizes else 3 * tile
    if side % tile or side < 2 * tile:
        raise ConfigError("dual needs an image side that is n tiles, n >= 2", given=side,
                          expected=f"a multiple of {tile}, e.g. {3 * tile}", fix=f"pass --img-sizes {3 * tile}")
    return replace(base, img_sizes=(side,))


# ---- the registry: one record per strategy --------------------------------------------------------------------
@dataclass(frozen=True)
class ImagePlan:
    """What the S² engine does with one image: the fitted size, per-scale sizes, tiles, and the output grid."""

    fitted_hw: tuple[int, int]
    engine_sizes: list  # passed to multiscale_forward as img_sizes: ints (square) or (h, w) tuples
    s2: S2Plan
    grid_hw: tuple[int, int]
    tokens: int
    channels: int


def plan_image(res: Any, orig_hw: tuple[int, int]) -> ImagePlan:
    """The S² plan of one image of `orig_hw` under the resolved config `res` (a run makes it once per image:
    `Planner`)."""
    bb = res.backbone
    fitted = fit_size(orig_hw, res.fit, res.side)
    if fitted[0] == fitted[1]:
        sizes: list = list(res.img_sizes)
    else:
        sizes = [(fitted[0] * s // res.side, fitted[1] * s // res.side) for s in res.img_sizes]
    s2 = plan_multiscale(fitted, img_sizes=sizes, max_split_size=res.max_split_size, split_mode=res.split_mode)
    tile = s2.scales[res.resize_output_to_idx].tile
    grid = s2.feature_grid(res.resize_output_to_idx, bb.feature_hw(tile))
    return ImagePlan(fitted, sizes, s2, grid, bb.num_prefix_tokens + grid[0] * grid[1], bb.channels * len(sizes))


@dataclass(frozen=True)
class ViewImagePlan:
    """What a dynamic-resolution strategy does with one image: its views and their backbone inputs (`views`), and
    where each output map's tokens go (`layout`)."""

    views: StrategyPlan
    layout: OutLayout


def plan_strategy_image(res: Any, orig_hw: tuple[int, int]) -> ViewImagePlan:
    """A dynamic-resolution strategy's plan of one image and the layout of its output tokens (a run makes it once
    per image: `Planner`)."""
    bb = res.backbone
    plan = plan_strategy(res.strategy_cfg, orig_hw)
    return ViewImagePlan(plan, out_layout(res.strategy_cfg, plan, bb.feature_hw, bb.channels, bb.num_prefix_tokens))


@dataclass(frozen=True)
class Planner:
    """A run's per-image planner: an image's plan from its (h, w) (`Strategy.plan`). The decode workers call it
    where an image's size is first known, and the plan travels in the image's decoded record to the engine and the
    writer, which read it and never plan again. Picklable: it goes to the workers with the decode settings."""

    res: Any  # the resolved config

    def __call__(self, orig_hw: tuple[int, int]) -> Any:
        return strategy_of(self.res).plan(self.res, orig_hw)


@dataclass(frozen=True)
class Strategy:
    """One entry of the registry: how a strategy is configured, planned, rendered, computed and stored. Every stage
    of a run asks the run's strategy (`strategy_of(res)`) to do its part, never which strategy it is."""

    name: str
    summary: str
    uses: tuple[str, ...] = ()  # the strategy and shape options (SHAPE_OPTIONS) it reads; any other one set is an error
    device_decode: bool = False  # --decode torch (JPEGs decoded and fitted on the device) applies
    any_size: bool = False  # the backbone is built to accept inputs of any size
    embeds: bool = False  # --pool embed (the model's image embeddings of each scale's tiles) applies

    def resolve(self, a: StrategyArgs, bb: BackboneFacts) -> StrategyCfg | None:
        """The strategy's settings, its defaults filled from its source (None: nothing to save)."""
        raise NotImplementedError

    def saved(self, cfg: StrategyCfg | None) -> dict[str, Any]:
        """What the saved config holds of the strategy's settings."""
        return {"strategy": cfg.to_dict()}  # type: ignore[union-attr]

    def plan(self, res: Any, orig_hw: tuple[int, int]) -> Any:
        """The plan of one image of `orig_hw` (h, w): what is computed from it, made once per image (`Planner`)."""
        raise NotImplementedError

    def plan_entry(self, res: Any, orig_hw: tuple[int, int]) -> tuple[dict[str, Any], list[tuple[Any, int]]]:
        """One image's dry-run entry (fitted_hw, tiles, grids, output_shape, ...) and its backbone inputs as
        (tile (h, w), count) pairs."""
        raise NotImplementedError

    def render(self, im: Any, plan: Any, fit: Any) -> Any:
        """In the decode worker: the decoded RGB image and its plan -> the engine's uint8 input(s), (3, H, W) each."""
        raise NotImplementedError

    def sink_shape(self, res: Any) -> dict[str, Any]:
        """The writer's shape: channels, num_scales (img_sizes entries per image), tokens (None: ragged),
        tokens_per_image (for the space a shard needs; None: unknown), plans (each image stores its plan)."""
        raise NotImplementedError

    def compute(self, ex: Any, recs: list[Any], on_fail: Callable[[dict], None]) -> list[Callable[[], list]]:
        """Start the backbone on a batch of decoded records (`inputs.decode.Decoded`; `ex`: the run's Extractor);
        return what waits for each part of it and gives (rec, features, pooled) triples."""
        raise NotImplementedError

    def item(self, res: Any, rec: Any, feats: Any, pooled: Any) -> StoredItem:
        """What the writer stores for one image (`items.StoredItem`) from its decoded record and its plan."""
        raise NotImplementedError

    def pictures(self, res: Any, plan: Any, views: list[Any]) -> list[tuple[Any, str, list]]:
        """For `s2 viz plan`: each scale's or view's picture, (3, H, W) uint8 made from the decoded `views` of an
        image of this `plan`, with a label and the boxes (top, left, bottom, right) of its backbone inputs."""
        raise NotImplementedError

    def engine_kwargs(self, res: Any, plan: Any) -> dict[str, Any] | None:
        """`multiscale_forward`'s arguments for an image of this `plan`, or None if the strategy does not run the S²
        engine (benchmarks compare it with the reference implementation)."""
        return None

    def describe(self, res: Any) -> str:
        """A resolved config's plan in a few characters, as `s2 recipes` lists it: the strategy's name."""
        return self.name


def _item(res: Any, rec: Any, grid_hw: tuple[int, int], sizes: list, feats: Any, pooled: Any,
          plan: str | None = None) -> StoredItem:
    return StoredItem(key=rec.key, source=rec.source, meta=rec.meta, orig_hw=rec.orig_hw,
                      grid_hw=grid_hw, img_sizes=sizes, num_prefix_tokens=res.backbone.num_prefix_tokens,
                      split_mode=res.split_mode, features=None if feats is None else feats.numpy(),
                      pooled=None if pooled is None else pooled.numpy(), plan=plan)


@dataclass(frozen=True)
class S2Strategy(Strategy):
    """The S²-Wrapper engine (tiling.py): the image fitted once to the largest scale, every scale derived from it
    on the device, all tiles of all scales batched."""

    def resolve(self, a: StrategyArgs, bb: BackboneFacts) -> StrategyCfg | None:
        return None

    def saved(self, cfg: StrategyCfg | None) -> dict[str, Any]:
        return {}  # outputs of the S² engine predate strategies: their config has no `strategy` entry

    def describe(self, res: Any) -> str:
        return ",".join(map(str, res.img_sizes))  # the scales' sizes

    def plan(self, res: Any, orig_hw: tuple[int, int]) -> ImagePlan:
        return plan_image(res, orig_hw)

    def plan_entry(self, res: Any, orig_hw: tuple[int, int]) -> tuple[dict[str, Any], list[tuple[Any, int]]]:
        p = plan_image(res, orig_hw)
        entry = {"fitted_hw": list(p.fitted_hw), "tiles": p.s2.num_tiles, "grids": p.s2.grids,
                 "output_shape": [p.tokens, p.channels], "output_grid": list(p.grid_hw)}
        return entry, [(sp.tile, sp.num_tiles) for sp in p.s2.scales]

    def render(self, im: Any, plan: Any, fit: Any) -> Any:
        return fit_to_array(im, fit)

    def sink_shape(self, res: Any) -> dict[str, Any]:
        first = plan_image(res, (res.side, res.side))
        return {"channels": first.channels, "num_scales": len(res.img_sizes),
                "tokens": first.tokens if res.fit != "keep" else None, "tokens_per_image": first.tokens, "plans": False}

    def compute(self, ex: Any, recs: list[Any], on_fail: Callable[[dict], None]) -> list[Callable[[], list]]:
        return ex.submit_s2(recs, on_fail)

    def engine_kwargs(self, res: Any, plan: Any) -> dict[str, Any] | None:
        bb = res.backbone
        return dict(img_sizes=plan.engine_sizes, max_split_size=res.max_split_size,
                    split_mode=res.split_mode, resize_output_to_idx=res.resize_output_to_idx,
                    num_prefix_token=bb.num_prefix_tokens, output_shape=bb.output_shape, antialias=res.antialias)

    def pictures(self, res: Any, plan: Any, views: list[Any]) -> list[tuple[Any, str, list]]:
        """The fitted image at every scale (the largest is the view itself; smaller ones resized with Pillow's
        bicubic for the picture, where the engine resizes the normalized tensor) and its tiles."""
        from PIL import Image

        fitted, out = views[0], []
        for sp in plan.s2.scales:
            pic = fitted
            if tuple(sp.canvas) != tuple(fitted.shape[1:]):
                im = Image.fromarray(fitted.transpose(1, 2, 0)).resize((sp.canvas[1], sp.canvas[0]), Image.BICUBIC)
                pic = to_uint8_array(im)
            th, tw = sp.tile
            boxes = [(r * th, c * tw, (r + 1) * th, (c + 1) * tw) for r in range(sp.grid[0]) for c in range(sp.grid[1])]
            out.append((pic, f"scale {sp.size[0]}x{sp.size[1]} {sp.grid[0]}x{sp.grid[1]}", boxes))
        return out

    def item(self, res: Any, rec: Any, feats: Any, pooled: Any) -> StoredItem:
        plan = rec.plan
        sizes = [(s, s) if isinstance(s, int) else tuple(s) for s in plan.engine_sizes]
        return _item(res, rec, plan.grid_hw, sizes, feats, pooled)


@dataclass(frozen=True)
class ViewStrategy(Strategy):
    """A dynamic-resolution strategy: views rendered from the original pixels by the decode workers, cut into
    backbone inputs, run together, then merged into the image's output maps."""

    resolver: Callable[[StrategyArgs, StrategyCfg, BackboneFacts], StrategyCfg] | None = None
    planner: Callable[[StrategyCfg, tuple[int, int]], StrategyPlan] | None = None
    layout: Callable[..., list[tuple[str, tuple[int, int]]]] | None = None
    merger: Callable[..., list[torch.Tensor]] | None = None
    channel_groups: tuple[str, ...] = ("features",)  # what each channel slice of the output holds
    views: int = 2  # views an image can have (an absent thumbnail counts)
    per_scale: bool = False  # one view and one channel group per scale (cfg.img_sizes) instead

    def groups(self, cfg: StrategyCfg) -> tuple[str, ...]:
        return tuple(f"scale{i}" for i in range(len(cfg.img_sizes))) if self.per_scale else self.channel_groups

    def max_views(self, cfg: StrategyCfg) -> int:
        return len(cfg.img_sizes) if self.per_scale else self.views

    def resolve(self, a: StrategyArgs, bb: BackboneFacts) -> StrategyCfg | None:
        return self.resolver(a, StrategyCfg(name=self.name, tile=bb.tile, fit=a.fit), bb)  # type: ignore[misc]

    def plan(self, res: Any, orig_hw: tuple[int, int]) -> ViewImagePlan:
        return plan_strategy_image(res, orig_hw)

    def plan_entry(self, res: Any, orig_hw: tuple[int, int]) -> tuple[dict[str, Any], list[tuple[Any, int]]]:
        p = plan_strategy_image(res, orig_hw)
        plan, lay = p.views, p.layout
        entry = {"fitted_hw": list(max((v.canvas for v in plan.views), key=lambda hw: hw[0] * hw[1])),
                 "tiles": plan.num_tiles, "grids": plan.grids, "output_shape": [lay.tokens, lay.channels],
                 "output_grid": list(lay.grid_hw),
                 "strategy": plan.strategy, "views": [v.name for v in plan.views]}
        return entry, [(v.tile, v.num_inputs) for v in plan.views]

    def render(self, im: Any, plan: Any, fit: Any) -> Any:
        return render_views(im, plan.views, fit)

    def sink_shape(self, res: Any) -> dict[str, Any]:
        cfg = res.strategy_cfg
        return {"channels": res.backbone.channels * len(self.groups(cfg)), "num_scales": self.max_views(cfg),
                "tokens": None, "tokens_per_image": None, "plans": True}

    def compute(self, ex: Any, recs: list[Any], on_fail: Callable[[dict], None]) -> list[Callable[[], list]]:
        done = ex.with_retry(ex.strategy_features, recs, on_fail)
        return [lambda: done]

    def pictures(self, res: Any, plan: Any, views: list[Any]) -> list[tuple[Any, str, list]]:
        """Each view as rendered (views cut from one source show that source) with its inputs (strided: one box)."""
        plan = plan.views
        out = []
        for i, v in enumerate(plan.views):
            label = f"{v.name} {v.grid[0]}x{v.grid[1]}" + (" strided" if v.cut == "strided" else "")
            boxes = v.boxes()[:1] if v.cut == "strided" else v.boxes()
            out.append((views[0 if plan.same_source else i], label, boxes))
        return out

    def item(self, res: Any, rec: Any, feats: Any, pooled: Any) -> StoredItem:
        """`img_sizes` holds each view's canvas ((0, 0) for an absent one), and `plan` (JSON) the strategy, views
        with their grids and tiles, tile count, thumbnail/base, and output maps."""
        plan, lay = rec.plan.views, rec.plan.layout
        sizes = [list(v.canvas) for v in plan.views]
        sizes += [[0, 0]] * (self.max_views(res.strategy_cfg) - len(sizes))
        meta = {"strategy": plan.strategy, "tiles": plan.num_tiles, "grids": plan.grids,
                "views": [{"name": v.name, "grid": list(v.grid), "tile": list(v.tile), "resize": list(v.resize),
                           "canvas": list(v.canvas), "cut": v.cut} for v in plan.views],
                "thumbnail": plan.view("thumbnail") is not None, "base": plan.view("base") is not None,
                "output_grid": list(lay.grid_hw), "output": lay.to_dict()}
        return _item(res, rec, lay.grid_hw, sizes, feats, pooled, plan=json.dumps(meta))


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    S2Strategy("s2", "S²-Wrapper: every scale fitted from one image, tiles of the backbone's size, stitched, "
                     "area-pooled to one grid, concatenated on channels", uses=SHAPE_OPTIONS, device_decode=True, embeds=True),
    ViewStrategy("dynamic-s2", "NVILA: every scale but the last squashed to k x k tiles, the last scale's grid by the "
                               "InternVL rule", uses=("max_tiles", "scales", "img_sizes", "max_split_size"), resolver=_resolve_dynamic_s2,
                 planner=_plan_dynamic_s2, layout=_layout_dynamic_s2, merger=_merge_dynamic_s2,
                 per_scale=True),
    ViewStrategy("anyres", "LLaVA-NeXT / OneVision: best pinpoint, resize + centered black pad, squashed base image first",
                 uses=("grid_pinpoints", "anyres_max", "max_split_size"), resolver=_resolve_anyres, planner=_plan_anyres,
                 layout=_layout_anyres, merger=_merge_anyres),
    ViewStrategy("internvl", "InternVL 1.5: min..max tiles by the InternVL rule, squashed thumbnail last",
                 uses=("min_tiles", "max_tiles", "thumbnail", "max_split_size"), resolver=_resolve_internvl, planner=_plan_internvl,
                 layout=_layout_internvl, merger=_merge_internvl),
    ViewStrategy("native", "Qwen2-VL: smart_resize to multiples of a factor, one input of any size",
                 uses=("min_pixels", "max_pixels", "max_split_size"), any_size=True, resolver=_resolve_native, planner=_plan_native,
                 layout=_layout_native, merger=_merge_native, views=1),
    ViewStrategy("dual", "INF-LLaVA: local tiles and strided sub-images of one n*S image, recombined into two maps",
                 uses=("scales", "img_sizes", "max_split_size", "fit"), resolver=_resolve_dual, planner=_plan_dual, layout=_layout_dual, merger=_merge_dual,
                 channel_groups=("local", "interleaved")),
)}


def strategy_of(res: Any) -> Strategy:
    """The registry's record of a resolved config's strategy."""
    return STRATEGIES[res.strategy]


def resolve_strategy(a: StrategyArgs, bb: BackboneFacts) -> StrategyCfg | None:
    """Validate the strategy options and fill the strategy's defaults from its source (None for s2)."""
    if a.strategy not in STRATEGIES:
        raise ConfigError("--strategy is not known", given=a.strategy, expected=" | ".join(STRATEGIES),
                          fix="pass --strategy s2 (the S²-Wrapper), or one of the dynamic-resolution strategies")
    record = STRATEGIES[a.strategy]
    stray = [f for f in a.set_fields if f not in record.uses]
    if stray:
        users = [s.name for s in STRATEGIES.values() if stray[0] in s.uses]
        by = a.set_by.get(stray[0], "flag")
        where = f" (set by the recipe {a.recipe})" if by == "recipe" and a.recipe else ""
        raise ConfigError(f"{a.flag(stray[0])} does not apply to --strategy {a.strategy}{where}: it would be "
                          "ignored", given=[a.flag(f) for f in stray], expected="options of " + " or ".join(users),
                          fix=f"drop {a.flag(stray[0])}, or pass --strategy {users[0]}")
    for name in ("min_tiles", "max_tiles", "anyres_max", "min_pixels", "max_pixels"):
        _positive(a, name)
    return record.resolve(a, bb)
