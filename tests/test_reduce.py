"""--reduce: each mode equals the same operation done by torch (avg_pool2d ceil_mode, pixel_unshuffle after a
zero pad, F.interpolate bilinear) on the unreduced stored features; shapes on the LLaVA-1.5-S2 and NVILA recipes;
dry-run bytes equal the stored bytes; what cannot be reduced is refused."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import s2cli
from s2cli.reduce import parse

VIT = dict(model="timm:test_vit", random_init=True, img_sizes=(160, 320), max_split_size=160, workers=0)
RESNET = dict(model="timm:test_resnet", random_init=True, img_sizes=(64, 128), max_split_size=64, workers=0)


def oracle(spec: str, feats: np.ndarray, hw: tuple[int, int], prefix: int) -> np.ndarray:
    """The reduction done by torch on (prefix + h*w, C) features."""
    mode, k = spec.split(":")
    k = int(k)
    h, w = hw
    x = torch.from_numpy(np.asarray(feats, np.float32))
    grid = x[prefix:].reshape(h, w, -1).permute(2, 0, 1)[None]  # (1, C, h, w)
    C = grid.shape[1]
    if mode == "avg":
        out = F.avg_pool2d(grid, k, ceil_mode=True)
    elif mode == "s2c":
        u = F.pixel_unshuffle(F.pad(grid, (0, -w % k, 0, -h % k)), k)[0]  # channel c*k*k + dy*k + dx
        out = u.reshape(C, k * k, *u.shape[1:]).permute(1, 0, 2, 3).reshape(1, k * k * C, *u.shape[1:])
    else:
        n = k
        t = (h * w / n) ** 0.5
        size = (h, w) if h * w <= n else (max(1, int(h // t)), max(1, int(w // t)))
        out = F.interpolate(grid, size=size, mode="bilinear", align_corners=False)
    body = out[0].permute(1, 2, 0).reshape(-1, out.shape[1])
    return torch.cat([x[:prefix], body]).numpy() if prefix else body.numpy()


@pytest.mark.parametrize("spec", ["avg:2", "avg:3", "s2c:2", "s2c:3", "budget:10", "budget:1", "budget:500"])
@pytest.mark.parametrize("hw,prefix", [((6, 8), 0), ((5, 7), 1), ((9, 4), 0), ((1, 1), 0)])
def test_each_mode_equals_its_torch_oracle(spec, hw, prefix):
    if spec.startswith("s2c") and prefix:
        return  # refused at config time (test below)
    rng = np.random.default_rng(hash((spec, hw)) % 2**32)
    x = rng.standard_normal((prefix + hw[0] * hw[1], 5)).astype(np.float32)
    y, grid = parse(spec).apply(x, hw, prefix)
    want = oracle(spec, x, hw, prefix)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    assert y.shape == (prefix + grid[0] * grid[1], want.shape[1])
    if spec.startswith("budget"):
        assert grid[0] * grid[1] <= int(spec.split(":")[1]) or grid == hw == (1, 1)


@pytest.mark.parametrize("spec,options", [("avg:2", dict(VIT, keep_cls=True)), ("budget:7", dict(VIT, keep_cls=True)),
                                          ("s2c:2", RESNET), ("avg:3", RESNET)])
@pytest.mark.parametrize("fit", [None, "keep"])
def test_a_reduced_run_equals_the_oracle_on_the_unreduced_stored_features(image_dir, tmp_path, spec, options, fit):
    s2cli.extract(str(image_dir), str(tmp_path / "full.h5"), fit=fit, **options)
    s2cli.extract(str(image_dir), str(tmp_path / "red.safetensors"), fit=fit, reduce=spec, **options)
    with s2cli.open_features(tmp_path / "full.h5") as full, s2cli.open_features(tmp_path / "red.safetensors") as red:
        assert list(full) == list(red)
        for k in full:
            m = full.meta(k)
            want = oracle(spec, full[k], m["grid_hw"], m["num_prefix_tokens"])
            np.testing.assert_allclose(red[k], want, rtol=1e-5, atol=1e-5)
            rec = red.meta(k)["reduce"]
            assert rec["op"] == spec and rec["grid_before"] == m["grid_hw"]
            assert red.meta(k)["grid_hw"] == rec["grid_hw"]
            assert red[k].shape[0] == m["num_prefix_tokens"] + rec["grid_hw"][0] * rec["grid_hw"][1]


@pytest.mark.parametrize("recipe,spec", [("llava-1.5-s2", "avg:2"), ("llava-1.5-s2", "budget:100"),
                                         ("nvila-dynamic-s2", "s2c:2"), ("nvila-dynamic-s2", "budget:729")])
def test_recipe_shapes_are_the_oracle_shapes(image_dir, recipe, spec):
    full = s2cli.plan(str(image_dir), "o.h5", recipe=recipe, random_init=True)
    red = s2cli.plan(str(image_dir), "o.h5", recipe=recipe, random_init=True, reduce=spec)
    prefix = s2cli.settings(str(image_dir), "o.h5", recipe=recipe, random_init=True).backbone.num_prefix_tokens
    for a, b in zip(full["images"], red["images"]):
        tokens, channels = a["output_shape"]
        want = oracle(spec, np.zeros((tokens, 1), np.float32), a["output_grid"], prefix).shape
        want_channels = channels * int(spec.split(":")[1]) ** 2 if spec.startswith("s2c") else channels
        assert b["output_shape"] == [want[0], want_channels]
        assert b["reduced_from"] == {"output_shape": a["output_shape"], "output_grid": a["output_grid"]}


@pytest.mark.parametrize("options", [dict(RESNET, reduce="s2c:2"), dict(RESNET, reduce="avg:2", fit="keep", pool="mean"),
                                     dict(VIT, keep_cls=True, reduce="budget:5", pool="cls", pool_only=True),
                                     dict(RESNET, reduce="s2c:2", pool="mean", dtype="bfloat16")])
def test_dry_run_bytes_of_a_reduced_run_are_the_stored_bytes(image_dir, tmp_path, options):
    plan = s2cli.plan(str(image_dir), str(tmp_path / "o.h5"), **options)
    s2cli.extract(str(image_dir), str(tmp_path / "o.h5"), **options)
    stored = 0
    with s2cli.open_features(tmp_path / "o.h5") as r:
        item = 2 if r.dtype in ("float16", "bfloat16") else 4
        for k in r:
            stored += (r[k].size if r.feature_shape is not None else 0) + (r.pooled(k).size if "pool" in options else 0)
    assert abs(plan["total_bytes"] - stored * item) <= 0.01 * stored * item


def test_what_cannot_be_reduced_is_refused(image_dir):
    with pytest.raises(s2cli.ConfigError, match="prefix tokens"):
        s2cli.settings(str(image_dir), "o.h5", reduce="s2c:2", keep_cls=True, **VIT)
    for bad in ("avg", "avg:1", "mean:2", "budget:x"):
        with pytest.raises(s2cli.ConfigError, match="--reduce"):
            s2cli.settings(str(image_dir), "o.h5", reduce=bad, **RESNET)
    with pytest.raises(s2cli.ConfigError, match="one token grid"):
        s2cli.settings(str(image_dir), "o.h5", reduce="avg:2", strategy="anyres",
                       **{k: v for k, v in VIT.items() if k != "img_sizes"})  # anyres refuses --img-sizes
