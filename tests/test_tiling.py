"""The S² engine against the reference's golden outputs and against oracles written out in the test."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import GOLDEN, TENSORS, ToyConv, golden_kwargs
from s2cli import ConfigError, multiscale_forward, plan_multiscale
from s2cli.tiling import area_resize, plan_multiscale as _plan, scale_image, tokens_to_map


@pytest.mark.parametrize("name", sorted(GOLDEN["cases"]))
def test_golden_parity(name):
    case = GOLDEN["cases"][name]
    kw = golden_kwargs(case)
    model = ToyConv(TENSORS[f"{name}.weight"], TENSORS[f"{name}.bias"], case["stride"],
                    kw.get("output_shape", "bnc"), kw.get("num_prefix_token", 0))
    out = multiscale_forward(model, TENSORS[f"{name}.input"], **kw)
    ref = TENSORS[f"{name}.output"]
    assert list(out.shape) == case["output"] == list(ref.shape)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_golden_file_covers_both_branches():
    branches = {c["branch"] for c in GOLDEN["cases"].values()}
    assert branches == {"master", "any_shape"}
    assert len(GOLDEN["cases"]) == 10


def reference_split(x, nh, nw):
    # the reference's loop: tiles concatenated on the batch axis, row-major
    B, C, H, W = x.shape
    h, w = H // nh, W // nw
    return torch.cat([x[:, :, i * h:(i + 1) * h, j * w:(j + 1) * w] for i in range(nh) for j in range(nw)], dim=0)


def split_tiles(x, grid):
    """(B, C, nh*h, nw*w) -> (nh*nw*B, C, h, w), tile-major: index (row * nw + col) * B + b."""
    B, C, H, W = x.shape
    nh, nw = grid
    return x.reshape(B, C, nh, H // nh, nw, W // nw).permute(2, 4, 0, 1, 3, 5).reshape(nh * nw * B, C, H // nh, W // nw)


def merge_tiles(x, grid):
    """Inverse of split_tiles."""
    N, C, h, w = x.shape
    nh, nw = grid
    return x.reshape(nh, nw, N // (nh * nw), C, h, w).permute(2, 3, 0, 4, 1, 5).reshape(N // (nh * nw), C, nh * h, nw * w)


def materialized_forward(model, x, scales=None, img_sizes=None, max_split_size=None, split_mode="resize",
                         resize_output_to_idx=0, num_prefix_token=0, output_shape="bnc", merge="concat",
                         max_batch=None, fuse=True):
    """Oracle: the engine as it was before tiles were cut lazily: every scale's tiles cut and stacked, the stack
    run in calls of max_batch, every output kept, stitched, pooled and concatenated at the end."""
    b, P = x.shape[0], num_prefix_token
    plan = _plan(tuple(x.shape[-2:]), scales, img_sizes, max_split_size, split_mode)
    tiles = [split_tiles(scale_image(x, sp, split_mode), sp.grid) for sp in plan.scales]

    def call(t):
        return model(t) if max_batch is None else torch.cat([model(p) for p in t.split(max_batch)])
    if fuse and len({t.shape[1:] for t in tiles}) == 1:
        outs = list(call(torch.cat(tiles)).split([t.shape[0] for t in tiles]))
    else:
        outs = [call(t) for t in tiles]
    maps, prefixes = [], []
    for sp, out in zip(plan.scales, outs):
        if output_shape == "bnc":
            if P:
                prefixes.append(out[:, :P].reshape(sp.num_tiles, b, P, -1).mean(dim=0))
            out = tokens_to_map(out[:, P:])
        fmap = merge_tiles(out, sp.grid)
        ch, cw = plan.feature_grid(plan.scales.index(sp), tuple(out.shape[-2:]))
        maps.append(fmap[:, :, :ch, :cw])

    def finish(m, p):
        if output_shape == "bchw":
            return m
        t = m.flatten(2).transpose(1, 2)
        return t if p is None else torch.cat([p, t], dim=1)
    if merge == "none":
        return [finish(m, prefixes[i] if prefixes else None) for i, m in enumerate(maps)]
    size = tuple(maps[resize_output_to_idx].shape[-2:])
    return finish(torch.cat([area_resize(m, size) for m in maps], dim=1), torch.cat(prefixes, -1) if prefixes else None)


ORACLE_CASES = [  # (input hw, kwargs): direct writes, tile-by-tile pooling, whole-map pooling, crops, upsampling
    ((16, 16), dict(scales=[1, 2, 3])),                                   # 2x2 tiles pool tile by tile, 3x3 too
    ((16, 16), dict(scales=[1, 2], num_prefix_token=1)),
    ((16, 16), dict(scales=[1, 2, 3], num_prefix_token=2, resize_output_to_idx=-1)),  # upsampling: whole maps
    ((16, 16), dict(scales=[1, 2, 3], resize_output_to_idx=1)),           # 3x scale to 2x grid: non-integer ratio
    ((16, 16), dict(scales=[1, 2, 3], output_shape="bchw")),
    ((16, 16), dict(img_sizes=[16, 24], max_split_size=16)),               # tiles of 16 and 12: one stream per scale
    ((16, 16), dict(img_sizes=[32, 16], max_split_size=16, num_prefix_token=1)),  # output grid from a later scale
    ((32, 32), dict(img_sizes=[8, 16], max_split_size=8)),                 # 1x1 pooled tiles: whole-map pooling
    ((24, 40), dict(img_sizes=[(16, 32), (32, 64)], max_split_size=16, split_mode="pad")),
    ((24, 40), dict(img_sizes=[(20, 36), (40, 72)], max_split_size=16, split_mode="pad", num_prefix_token=1)),  # crops
    ((24, 40), dict(img_sizes=[(20, 36), (40, 72)], max_split_size=16, split_mode="resize", num_prefix_token=2)),
    ((20, 36), dict(scales=[1, 1.5], max_split_size=16, split_mode="pad", output_shape="bchw")),
    ((16, 16), dict(scales=[1, 2], num_prefix_token=1, merge="none")),
]


@pytest.mark.parametrize("hw, kw", ORACLE_CASES)
@pytest.mark.parametrize("max_batch", [None, 1, 2, 3, 5, 7, 1000])
@pytest.mark.parametrize("fuse", [True, False])
def test_lean_engine_equals_materialized_oracle(toy, hw, kw, max_batch, fuse):
    """Tiles cut per call, outputs written into place and pooled as scales complete: exactly the numbers of
    cutting everything, running the same calls, keeping every output and merging at the end (batch 2, so chunk
    sizes 3, 5, 7 split a tile's images across calls and calls across scales)."""
    m = toy(output_shape=kw.get("output_shape", "bnc"), num_prefix=kw.get("num_prefix_token", 0))
    x = torch.randn(2, 3, *hw)
    got = multiscale_forward(m, x, max_batch=max_batch, fuse=fuse, **kw)
    m.calls.clear()
    want = materialized_forward(m, x, max_batch=max_batch, fuse=fuse, **kw)
    for g, w in zip(*([got, want] if isinstance(got, list) else [[got], [want]])):
        assert g.shape == w.shape and torch.equal(g, w)


def test_lean_engine_bf16_equals_oracle(toy):
    m = toy(num_prefix=1)
    m.weight, m.bias = m.weight.bfloat16(), m.bias.bfloat16()
    x = torch.randn(3, 3, 16, 16).bfloat16()
    for mb in (None, 3):
        got = multiscale_forward(m, x, scales=[1, 2, 3], num_prefix_token=1, max_batch=mb)
        assert got.dtype == torch.bfloat16 and torch.equal(got, materialized_forward(m, x, scales=[1, 2, 3],
                                                                                     num_prefix_token=1, max_batch=mb))


@pytest.mark.parametrize("grid", [(1, 1), (2, 2), (2, 3), (3, 1)])
def test_tile_order_and_inverse(grid):
    x = torch.randn(2, 3, 6 * grid[0], 4 * grid[1])
    tiles = split_tiles(x, grid)
    assert torch.equal(tiles, reference_split(x, *grid))
    # batch index (row * n_cols + col) * B + b
    r, c, b = grid[0] - 1, grid[1] - 1, 1
    assert torch.equal(tiles[(r * grid[1] + c) * 2 + b], x[b, :, r * 6:(r + 1) * 6, c * 4:(c + 1) * 4])
    assert torch.equal(merge_tiles(tiles, grid), x)


@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_scale_one_equals_plain_backbone(toy, prefix):
    model = toy(num_prefix=prefix)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(multiscale_forward(model, x, scales=[1], num_prefix_token=prefix), model(x))


def test_bnc_and_bchw_agree_on_convnet(toy):
    m = toy(output_shape="bchw")
    tok = ToyConv(m.weight, m.bias, m.stride, "bnc")
    x = torch.randn(2, 3, 16, 16)
    a = multiscale_forward(m, x, scales=[1, 2, 3], output_shape="bchw")
    b = multiscale_forward(tok, x, scales=[1, 2, 3], output_shape="bnc")
    assert torch.equal(a.flatten(2).transpose(1, 2), b)


def test_prefix_tokens_are_averaged_over_tiles(toy):
    m = toy(num_prefix=2)
    x = torch.randn(3, 3, 16, 16)
    out = multiscale_forward(m, x, scales=[1, 2], num_prefix_token=2)
    big = F.interpolate(x, size=(32, 32), mode="bicubic")
    per_tile = [m(big[:, :, 16 * i:16 * (i + 1), 16 * j:16 * (j + 1)])[:, :2] for i in range(2) for j in range(2)]
    expect = torch.cat([m(x)[:, :2], sum(per_tile) / 4], dim=-1)
    torch.testing.assert_close(out[:, :2], expect, atol=1e-6, rtol=1e-6)
    assert out.shape == (3, 2 + 16, 16)


def test_any_shape_scales_without_img_sizes(toy):
    """The reference raises TypeError here; the intended sizes are (int(h*s), int(w*s))."""
    m = toy()
    x = torch.randn(1, 3, 20, 36)
    out = multiscale_forward(m, x, scales=[1, 1.5], max_split_size=16, split_mode="pad")
    ref = multiscale_forward(m, x, img_sizes=[(20, 36), (30, 54)], max_split_size=16, split_mode="pad")
    assert torch.equal(out, ref)
    plan = plan_multiscale((20, 36), scales=[1, 1.5], max_split_size=16, split_mode="pad")
    assert [s.size for s in plan.scales] == [(20, 36), (30, 54)]
    assert plan.branch == "any_shape" and plan.grids == [[2, 3], [2, 4]]


@pytest.mark.parametrize("kw", [
    dict(scales=[1, 2, 3]),
    dict(scales=[1, 2], num_prefix_token=1),
    dict(img_sizes=[(16, 32), (32, 64)], max_split_size=16, split_mode="pad"),
    dict(img_sizes=[(20, 36), (40, 72)], max_split_size=16, split_mode="resize", num_prefix_token=2),
])
@pytest.mark.parametrize("opts", [dict(max_batch=3), dict(split_forward=True), dict(max_batch=1000)])
def test_fused_call_equals_per_scale_loop(toy, kw, opts):
    m = toy(num_prefix=kw.get("num_prefix_token", 0))
    H, W = (16, 16) if "scales" in kw else (24, 40)
    x = torch.randn(2, 3, H, W)
    loop = multiscale_forward(m, x, fuse=False, **kw)
    m.calls.clear()
    fused = multiscale_forward(m, x, **kw, **opts)
    torch.testing.assert_close(fused, loop, atol=1e-6, rtol=1e-6)
    chunk = opts.get("max_batch") or 2
    total = sum(s[0] for s in m.calls)
    assert all(c[0] <= chunk for c in m.calls)
    assert len(m.calls) == math.ceil(total / chunk)  # one stack over all scales, cut only by the chunk size


def test_fused_is_one_call_without_chunking(toy):
    m = toy()
    multiscale_forward(m, torch.randn(2, 3, 16, 16), scales=[1, 2, 3])
    assert m.calls == [(2 * 14, 3, 16, 16)]


def test_square_branch_tiles_are_size_over_n():
    plan = plan_multiscale((500, 500), img_sizes=[500], max_split_size=336)
    assert plan.branch == "square" and plan.scales[0].grid == (2, 2) and plan.scales[0].tile == (250, 250)
    any_shape = plan_multiscale((500, 500), img_sizes=[500], max_split_size=336, split_mode="pad")
    assert any_shape.scales[0].tile == (336, 336) and any_shape.scales[0].canvas == (672, 672)


def test_merge_none_returns_each_scale(toy):
    m = toy(num_prefix=1)
    x = torch.randn(2, 3, 16, 16)
    maps = multiscale_forward(m, x, scales=[1, 2], num_prefix_token=1, merge="none")
    assert [tuple(t.shape) for t in maps] == [(2, 1 + 16, 8), (2, 1 + 64, 8)]
    cat = multiscale_forward(m, x, scales=[1, 2], num_prefix_token=1)
    big = maps[1][:, 1:].transpose(1, 2).reshape(2, 8, 8, 8)
    pooled = F.adaptive_avg_pool2d(big, 4).flatten(2).transpose(1, 2)
    torch.testing.assert_close(cat[:, 1:], torch.cat([maps[0][:, 1:], pooled], -1), atol=1e-6, rtol=0)
    torch.testing.assert_close(cat[:, :1], torch.cat([maps[0][:, :1], maps[1][:, :1]], -1))


def test_antialias_only_changes_downscaling(toy):
    m = toy()
    x = torch.randn(1, 3, 32, 32)
    plain = multiscale_forward(m, x, img_sizes=[16, 32], max_split_size=16)
    aa = multiscale_forward(m, x, img_sizes=[16, 32], max_split_size=16, antialias=True)
    small = F.interpolate(x, size=(16, 16), mode="bicubic", antialias=True)
    torch.testing.assert_close(aa[:, :, :8], m(small), atol=1e-6, rtol=0)
    assert not torch.allclose(plain[:, :, :8], aa[:, :, :8])
    torch.testing.assert_close(aa[:, :, 8:], plain[:, :, 8:])  # the 32 scale is not resized either way


@pytest.mark.parametrize("kw, words", [
    (dict(scales=[0, 1]), ["scales", "0"]),
    (dict(scales=[-1]), ["scales", "-1"]),
    (dict(), ["scales", "img_sizes"]),
    (dict(scales=[1], split_mode="crop"), ["split_mode", "crop"]),
    (dict(scales=[1], output_shape="nchw"), ["output_shape", "nchw"]),
    (dict(scales=[1], output_shape="bchw", num_prefix_token=1), ["bchw", "prefix"]),
    (dict(scales=[1, 2], resize_output_to_idx=2), ["resize_output_to_idx", "2"]),
    (dict(img_sizes=[17], max_split_size=8), ["17", "3x3"]),
    (dict(img_sizes=[16, (32, 32)]), ["img_sizes"]),
    (dict(scales=[1], max_split_size=0), ["max_split_size", "0"]),
    (dict(scales=[1], merge="sum"), ["merge", "sum"]),
])
def test_invalid_arguments_name_argument_value_and_fix(toy, kw, words):
    with pytest.raises(ConfigError) as e:
        multiscale_forward(toy(), torch.randn(1, 3, 16, 16), **kw)
    msg = str(e.value)
    assert "Fix:" in msg
    for w in words:
        assert w in msg


def test_non_square_token_count_is_an_error():
    with pytest.raises(ConfigError, match="not a square"):
        multiscale_forward(lambda x: torch.zeros(x.shape[0], 17, 4), torch.randn(1, 3, 16, 16), scales=[1])


def test_non_square_input_needs_max_split_size(toy):
    with pytest.raises(ConfigError, match="max_split_size"):
        multiscale_forward(toy(), torch.randn(1, 3, 16, 32), scales=[1])


def test_input_must_be_4d(toy):
    with pytest.raises(ConfigError, match="4-D"):
        multiscale_forward(toy(), torch.randn(3, 16, 16), scales=[1])
