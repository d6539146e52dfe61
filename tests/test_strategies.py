"""Dynamic-resolution strategies: planners against the published implementations (transformers' own functions,
10,000 random sizes each), the NVILA tile counts, pixel tests of cutting, and merger oracles with a toy backbone."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import invoke_json
from s2cli import open_features
from s2cli.backbones import load_backbone, resolve
from s2cli.errors import ConfigError
from s2cli.strategies import (
    LLAVA_NEXT_PINPOINTS,
    BackboneFacts,
    StrategyArgs,
    StrategyCfg,
    cut_view,
    grouped_calls,
    internvl_grid,
    merge,
    out_layout,
    outputs_to_maps,
    plan_strategy,
    resolve_strategy,
    select_best_resolution,
    smart_resize,
)

N = 10_000


def _sizes(seed: int, lo: int = 1, hi: int = 4000) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(N):
        if rng.random() < 0.3:  # small and extreme shapes too
            out.append((rng.randint(lo, 64), rng.randint(lo, hi)) if rng.random() < 0.5 else (rng.randint(lo, hi), rng.randint(lo, 64)))
        else:
            out.append((rng.randint(lo, hi), rng.randint(lo, hi)))
    return out


def test_anyres_select_best_resolution_equals_transformers():
    from transformers.image_processing_utils import select_best_resolution as ref

    onevision = [(384 * i, 384 * j) for i in range(1, 7) for j in range(1, 7)]
    for k, hw in enumerate(_sizes(1)):
        pins = list(LLAVA_NEXT_PINPOINTS) if k % 2 else onevision
        assert select_best_resolution(hw, pins) == tuple(ref(hw, pins)), hw


def test_native_smart_resize_equals_transformers_qwen2_vl():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as ref

    rng = random.Random(2)
    checked = 0
    for h, w in _sizes(2, lo=1, hi=6000):
        if max(h, w) / min(h, w) > 200:
            with pytest.raises(ConfigError, match="aspect ratio"):
                smart_resize(h, w)
            with pytest.raises(ValueError):
                ref(h, w)
            continue
        lo, hi = rng.choice([(56 * 56, 28 * 28 * 1280), (3136, 12845056), (256 * 28 * 28, 1024 * 28 * 28)])
        factor = rng.choice([28, 28, 32, 16])
        assert smart_resize(h, w, factor, lo, hi) == tuple(ref(h, w, factor, lo, hi)), (h, w, factor, lo, hi)
        checked += 1
    assert checked > 9000
    assert smart_resize(70, 70, 28, 1, 10**9) == (56, 56)  # round half to even: 70/28 = 2.5 -> 2
    assert smart_resize(10, 500) == tuple(ref(10, 500)) == (28, 420)  # a side below the factor is lifted, no error


def test_internvl_grid_equals_got_ocr2_canvas():
    from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas as ref

    rng = random.Random(3)
    for h, w in _sizes(3):
        lo, hi = rng.choice([(1, 12), (1, 6), (1, 40), (9, 12), (2, 9)])
        S = rng.choice([448, 384, 336])
        assert internvl_grid(w, h, lo, hi, S) == tuple(ref((h, w), (S, S), lo, hi)), (h, w, lo, hi, S)


def _cfg(strategy: str, tile: int = 448, **kw) -> StrategyCfg:
    return resolve_strategy(StrategyArgs(strategy=strategy, set_fields=tuple(k for k, v in kw.items() if v is not None and k != "img_sizes"), **kw),
                            BackboneFacts(tile, 14, False))


@pytest.mark.parametrize("wh, tiles, grid", [((1000, 1000), 14, (3, 3)), ((1920, 1080), 17, (3, 4)),
                                             ((1080, 1920), 15, (5, 2)), ((3000, 1000), 17, (2, 6))])
def test_nvila_dynamic_s2_tile_counts(wh, tiles, grid):
    cfg = _cfg("dynamic-s2", img_sizes=(448, 896, 1344))
    plan = plan_strategy(cfg, (wh[1], wh[0]))
    assert plan.num_tiles == tiles and tuple(plan.views[-1].grid) == grid
    assert plan.grids[:2] == [[1, 1], [2, 2]] and cfg.max_tiles == 12 and cfg.min_tiles == 9


def test_internvl_thumbnail_last_only_with_more_than_one_tile():
    cfg = _cfg("internvl")
    plan = plan_strategy(cfg, (500, 1000))
    assert [v.name for v in plan.views] == ["grid", "thumbnail"] and plan.views[0].grid == (1, 2)
    one = plan_strategy(_cfg("internvl", max_tiles=1), (500, 1000))
    assert [v.name for v in one.views] == ["grid"] and one.num_tiles == 1
    assert [v.name for v in plan_strategy(_cfg("internvl", thumbnail=False), (500, 1000)).views] == ["grid"]


def test_tiles_are_row_major_and_strided_crops_interleave_back():
    x = torch.arange(3 * 12 * 12, dtype=torch.float32).reshape(3, 12, 12)
    cfg = _cfg("dual", tile=4, img_sizes=(12,))
    local, strided = plan_strategy(cfg, (12, 12)).views
    tiles = cut_view(x, local)
    for i, (top, left, bottom, right) in enumerate(local.boxes()):
        assert torch.equal(tiles[i], x[:, top:bottom, left:right])
    assert torch.equal(tiles[1], x[:, 0:4, 4:8])  # row-major: the second tile is to the right of the first
    sub = cut_view(x, strided)
    assert torch.equal(sub[3 * 1 + 2], x[:, 1::3, 2::3])
    back = torch.empty_like(x)
    for a in range(3):
        for b in range(3):
            back[:, a::3, b::3] = sub[3 * a + b]
    assert torch.equal(back, x)


def _run(toy_model, cfg, plan, views_px):
    inputs = [cut_view(px, v) for v, px in zip(plan.views, views_px)]
    outs = grouped_calls(toy_model, inputs)
    fhw = lambda t: (t[0] // 4, t[1] // 4)  # noqa: E731 - ToyConv has stride 4
    per_view = [outputs_to_maps(o, toy_model.num_prefix, toy_model.output_shape, fhw(v.tile)) for o, v in zip(outs, plan.views)]
    layout = out_layout(cfg, plan, fhw, 8, toy_model.num_prefix)
    return merge(cfg, plan, per_view, layout), layout


def test_dual_merger_oracle(toy):
    model = toy()
    cfg = _cfg("dual", tile=16, img_sizes=(48,))
    plan = plan_strategy(cfg, (48, 48))
    x = torch.randn(3, 48, 48)
    tokens, layout = _run(model, cfg, plan, [x, x])
    assert len(model.calls) == 1 and model.calls[0][0] == 18  # local and strided inputs in one call
    fmap = tokens.T.reshape(16, 12, 12)
    conv = lambda im: F.conv2d(im[None], model.weight, model.bias, stride=4)[0]  # noqa: E731
    assert torch.allclose(fmap[:8, 4:8, 0:4], conv(x[:, 16:32, 0:16]), atol=1e-5)  # local tile (1, 0)
    assert torch.allclose(fmap[8:, 1::3, 2::3], conv(x[:, 1::3, 2::3]), atol=1e-5)  # strided (1, 2) interleaved
    assert layout.channels == 16 and layout.grid_hw == (12, 12)


def test_dynamic_s2_merger_oracle_area_to_last_grid(toy):
    model = toy(num_prefix=1)
    cfg = _cfg("dynamic-s2", tile=16, img_sizes=(16, 32), max_tiles=6)
    plan = plan_strategy(cfg, (20, 50))  # aspect 2.5, 4..6 tiles: 3 cols x 2 rows (|2.5 - 1.5|) is closest
    px = [torch.randn(3, *v.canvas) for v in plan.views]
    tokens, layout = _run(model, cfg, plan, px)
    rows, cols = plan.views[-1].grid
    assert (rows, cols) == (2, 3)
    h, w = rows * 4, cols * 4
    assert tokens.shape == (1 + h * w, 16) and layout.tokens == tokens.shape[0]
    conv = lambda im: F.conv2d(im[None], model.weight, model.bias, stride=4)  # noqa: E731
    s0 = F.interpolate(conv(px[0]), size=(h, w), mode="area")[0]
    assert torch.allclose(tokens[1:, :8].T.reshape(8, h, w), s0, atol=1e-5)
    # prefix: per scale, the mean of the prefix token over that scale's tiles
    c1 = [conv(t)[0].flatten(1).mean(1) for t in cut_view(px[1], plan.views[1])]
    assert torch.allclose(tokens[0, 8:], torch.stack(c1).mean(0), atol=1e-5)


def test_anyres_merger_unpads_and_puts_base_first(toy):
    model = toy()
    cfg = _cfg("anyres", tile=16, grid_pinpoints=((16, 32), (32, 16), (32, 32)))
    plan = plan_strategy(cfg, (10, 40))  # wide: 16x32, resized to 8x32, padded 4 rows top and bottom
    base, grid = plan.views
    assert grid.canvas == (16, 32) and grid.resize == (8, 32) and grid.pad == (4, 0)
    px = [torch.randn(3, 16, 16), torch.randn(3, 16, 32)]
    tokens, layout = _run(model, cfg, plan, px)
    conv = lambda im: F.conv2d(im[None], model.weight, model.bias, stride=4)[0]  # noqa: E731
    assert torch.allclose(tokens[:16].T.reshape(8, 4, 4), conv(px[0]), atol=1e-5)
    full = torch.cat([conv(px[1][:, :, :16]), conv(px[1][:, :, 16:])], dim=2)  # (8, 4, 8)
    assert [m.name for m in layout.maps] == ["base", "grid"] and layout.maps[1].hw == (2, 8)
    assert torch.allclose(tokens[16:].T.reshape(8, 2, 8), full[:, 1:3], atol=1e-5)


def test_onevision_anyres_max_reduces_bilinearly():
    cfg = _cfg("anyres", tile=384, grid_pinpoints=tuple((384 * i, 384 * j) for i in range(1, 7) for j in range(1, 7)),
               anyres_max=9)
    plan = plan_strategy(cfg, (2304, 2304))
    layout = out_layout(cfg, plan, lambda t: (27, 27), 1152, 0)
    # 6x6 tiles -> 162x162 unpadded; sqrt(162² / (9 * 27²)) = 2 > 1.1 -> (81, 81)
    assert layout.maps[1].hw == (81, 81) and plan.num_tiles == 37


def test_native_needs_a_variable_size_backbone_and_plans_one_input():
    with pytest.raises(ConfigError, match="any input size"):
        resolve_strategy(StrategyArgs(strategy="native"), BackboneFacts(336, 14, False, "clip-vit-l-336"))
    cfg = resolve_strategy(StrategyArgs(strategy="native"), BackboneFacts(224, 14, True, "dinov2-l"))
    assert cfg.factor == 28
    plan = plan_strategy(cfg, (1080, 1920))
    assert plan.num_tiles == 1 and plan.views[0].tile == smart_resize(1080, 1920)


def test_options_that_do_not_apply_are_refused():
    with pytest.raises(ConfigError, match="--grid-pinpoints does not apply"):
        resolve_strategy(StrategyArgs(strategy="internvl", grid_pinpoints=((336, 672),), set_fields=("grid_pinpoints",)),
                         BackboneFacts(336, 14, False, "clip-vit-l-336"))
    with pytest.raises(ConfigError, match="--strategy is not known"):
        resolve_strategy(StrategyArgs(strategy="tiles"), BackboneFacts(336, 14, False, "clip-vit-l-336"))


# ---- through `s2 extract`: folders, WebDataset shards, output folders, resume --------------------------------
VIT = ["-m", "timm:test_vit", "--random-init", "-j", "0"]  # 160 px tiles, patch 16, 64 channels, CLS prefix
PER_STRATEGY = {"dynamic-s2": ["--img-sizes", "160,320"], "anyres": [], "internvl": ["--max-tiles", "6"],
                "native": ["--max-pixels", "40000"], "dual": ["--img-sizes", "320"]}


@pytest.mark.parametrize("strategy", sorted(PER_STRATEGY))
def test_every_strategy_extracts_what_its_dry_run_plans(cli, image_dir, tmp_path, strategy):
    args = [image_dir, *VIT, "--strategy", strategy, *PER_STRATEGY[strategy]]
    plan = invoke_json(cli, "extract", *args, "--dry-run", "--json")
    out = tmp_path / "o.h5"
    invoke_json(cli, "extract", *args, "-o", out, "--json")
    with open_features(out) as ff:
        assert ff.attrs["strategy"] == strategy and json.loads(ff.attrs["config"])["strategy"]["name"] == strategy
        for im in plan["images"]:
            x, m = ff[im["key"]], ff.meta(im["key"])
            assert list(x.shape) == im["output_shape"] and np.isfinite(x).all()
            p = m["plan"]
            assert p["strategy"] == strategy and p["tiles"] == im["tiles"] and p["grids"] == im["grids"]
            assert m["grid_hw"] == p["output_grid"]
            assert x.shape[0] == p["output"]["prefix"] + sum(a["hw"][0] * a["hw"][1] for a in p["output"]["maps"])


def test_internvl_thumbnail_is_the_backbone_on_the_squashed_image(cli, image_dir, tmp_path):
    out = tmp_path / "o.h5"
    invoke_json(cli, "extract", image_dir, *VIT, "--seed", "5", "--strategy", "internvl", "-o", out, "--json")
    bb = load_backbone(resolve("timm:test_vit"), random_init=True, seed=5)
    cfg = bb.cfg
    im = Image.open(image_dir / "a.png").convert("RGB").resize((160, 160), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(im, np.float32).transpose(2, 0, 1).copy())[None] / 255
    x = (x - torch.tensor(cfg.mean).view(1, 3, 1, 1)) / torch.tensor(cfg.std).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = bb(x)[0, 1:].numpy()  # the thumbnail's spatial tokens
    with open_features(out) as ff:
        m = ff.meta("a")["plan"]
        assert m["thumbnail"] and [v["name"] for v in m["views"]][-1] == "thumbnail"
        thumb = next(a for a in m["output"]["maps"] if a["name"] == "thumbnail")
        start = m["output"]["prefix"] + thumb["offset"]
        np.testing.assert_allclose(ff["a"][start:start + 100], ref, atol=1e-4)


def test_strategies_on_webdataset_shards_into_a_resumable_folder(cli, shards, tmp_path):
    out = tmp_path / "feats"
    args = [str(shards / "{000000..000002}.tar"), *VIT, "--strategy", "anyres", "-o", f"{out}/", "--format",
            "safetensors", "--shard-size", "2"]
    s = invoke_json(cli, "extract", *args, "--json")
    assert s["num_images"] == 8 and s["num_failed"] == 1
    with open_features(out) as ff:
        first = {k: np.array(ff[k]) for k in ff}
        assert ff.meta("s004")["plan"]["base"] is True and ff.meta("s004")["meta"]["txt"] == "caption 4"
    again = invoke_json(cli, "extract", *args, "--json")  # resume: everything is done already
    assert again["num_images"] == 0 and again["resumed_images"] == 8
    r = cli("extract", *args[:-4], "--strategy", "internvl", "-o", f"{out}/", "--format", "safetensors")
    assert r.exit_code == 2 and "strategy" in r.stderr
    with open_features(out) as ff:
        assert all(np.array_equal(ff[k], v) for k, v in first.items())


def test_native_refuses_a_fixed_size_backbone_in_one_line(cli, image_dir):
    r = cli("extract", image_dir, "-m", "clip-vit-b-16", "--random-init", "--strategy", "native", "--dry-run")
    assert r.exit_code == 2 and "any input size" in r.stderr and "Fix:" in r.stderr
    r = cli("extract", image_dir, "-m", "clip-vit-b-16", "--random-init", "--grid-pinpoints", "224x448", "--dry-run")
    assert r.exit_code == 2 and "does not apply to --strategy s2" in r.stderr


# ---- s2 viz ------------------------------------------------------------------------------------------------------
def test_viz_plan_draws_each_views_tiles_in_its_color(cli, tmp_path):
    from conftest import write_image
    from s2cli.viz import GAP, LABEL, PALETTE, PANEL

    img = write_image(tmp_path / "wide.png", (100, 300), 7)  # internvl, 160 tiles: 1 row x 3 cols + thumbnail
    out = tmp_path / "plan.png"
    panels = invoke_json(cli, "viz", "plan", img, *VIT[:2], "--strategy", "internvl", "-o", out, "--json")
    assert [p["tiles"] for p in panels] == [3, 1]
    fig = Image.open(out).convert("RGB")
    w0 = panels[0]["size"][0]  # 256 wide, 85 high: three tiles of 85 px
    assert fig.size == (GAP + w0 + GAP + panels[1]["size"][0] + GAP, LABEL + PANEL + GAP)
    px = fig.load()
    scale = PANEL / 480
    for c in range(3):  # each tile's left border, in the grid view's color, halfway down
        assert px[GAP + round(c * 160 * scale), LABEL + 40] == PALETTE[0]
    assert px[GAP + w0 + GAP, LABEL + 100] == PALETTE[1]  # the thumbnail's border
    assert px[GAP + 40, LABEL + 40] != PALETTE[0]  # inside a tile: the image, not a border


def test_viz_features_shows_the_pca_of_each_stored_map(cli, image_dir, tmp_path):
    from s2cli.viz import GAP, LABEL, feature_maps, pca_rgb

    out = tmp_path / "o.h5"
    invoke_json(cli, "extract", image_dir, *VIT, "--strategy", "dual", "--img-sizes", "320", "-o", out, "--json")
    png = tmp_path / "pca.png"
    panels = invoke_json(cli, "viz", "features", out, "--key", "a", "-o", png, "--json")
    assert [p["label"] for p in panels] == ["a", "dual local 20x20", "dual interleaved 20x20", "dual (all) 20x20"]
    fig = Image.open(png).convert("RGB")
    assert fig.width == GAP + sum(p["size"][0] + GAP for p in panels)
    with open_features(out) as ff:
        maps = feature_maps(ff, "a")
    px = fig.load()
    for (label, fm), p in zip(maps, panels[1:]):
        rgb = pca_rgb(fm.reshape(-1, fm.shape[-1])).reshape(20, 20, 3)
        cell = p["size"][0] / 20
        for r, c in [(0, 0), (13, 17), (19, 5)]:
            assert px[p["x"] + int((c + 0.5) * cell), LABEL + int((r + 0.5) * cell)] == tuple(rgb[r, c])
    assert len({px[panels[1]["x"] + i * 6, LABEL + 50] for i in range(40)}) > 3  # a picture, not a flat color
