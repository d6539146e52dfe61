"""`--layers`: several hidden layers from one forward, each through the same merge. The oracle: each stored layer
equals a run of `--layer` alone with that layer (S² and a dynamic-resolution strategy; a tiny random-init CLIP from
the loopback hub and a timm ViT); dry-run bytes equal the stored bytes; every reader picks a layer."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import s2cli
from conftest import TINY
from s2cli.errors import ConfigError
from s2cli.layers import parse_layers
from s2cli.readers import open_features, summary

TIMM = dict(model="timm:test_vit", random_init=True, img_sizes=(160, 320), max_split_size=160, workers=0, pool="mean",
            limit=2)


def _clip_repo(hub, tmp_path) -> str:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**TINY)).eval().save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path / "clip")
    hub.add("org/tiny-clip", tmp_path / "clip")
    return "hf:org/tiny-clip"


def _stored_bytes(path) -> dict[str, int]:
    with open_features(path) as r:
        return {k: r[k].nbytes + (r.pooled(k).nbytes if r.attrs.get("pool") != "none" else 0) for k in r}


def _oracle(image_dir, tmp_path, suffix: str, layers: tuple[int, ...], flag: bool = True, **options) -> None:
    """Each layer of one `--layers` run equals its own `--layer` run (features and pooled vectors, 1e-5); the
    dry run's bytes are the stored bytes, image by image. `flag`: --layers given (else the recipe's)."""
    multi = tmp_path / f"multi{suffix}"
    given = {"layers": ",".join(map(str, layers))} if flag else {}
    s2cli.extract(str(image_dir), str(multi), **given, **options)
    plan = s2cli.plan(str(image_dir), str(multi), **given, **options)
    assert {i["key"]: i["bytes"] for i in plan["images"]} == _stored_bytes(multi)
    assert all(i["layers"] == list(layers) and i["output_shape"][0] == len(layers) for i in plan["images"])
    with open_features(multi) as every:
        assert json.loads(every.attrs["layers"]) == list(layers)
        for n, layer in enumerate(layers):
            one = tmp_path / f"one{layer}{suffix}"
            s2cli.extract(str(image_dir), str(one), layer=layer, **options)
            with open_features(one) as a, open_features(multi, layer=layer) as b:
                assert list(a) == list(b) == list(every) and a.feature_shape == b.feature_shape
                for k in a:
                    np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-5)
                    np.testing.assert_allclose(b.pooled(k), a.pooled(k), rtol=1e-5, atol=1e-5)
                    np.testing.assert_array_equal(every[k][n], b[k])
                    np.testing.assert_array_equal(every.pooled(k)[n], b.pooled(k))


def test_the_layers_syntax():
    assert parse_layers("-1,-2,-12") == (-1, -2, -12)
    assert parse_layers("-4:-1") == (-4, -3, -2, -1)
    assert parse_layers("3:1,-1") == (3, 2, 1, -1)
    assert parse_layers([-1, "1:2"]) == (-1, 1, 2) and parse_layers(-2) == (-2,) and parse_layers(None) is None
    for bad, why in (("-1,-1", "twice"), ("a,b", "not a list"), ("", "not a list"), ([True], "indices")):
        with pytest.raises(ConfigError, match=why):
            parse_layers(bad)


@pytest.mark.slow
def test_each_layer_of_a_timm_vit_equals_its_own_run_s2(image_dir, tmp_path):
    _oracle(image_dir, tmp_path, ".h5", (-1, 1), **TIMM)


@pytest.mark.slow
def test_each_layer_of_a_timm_vit_equals_its_own_run_anyres(image_dir, tmp_path):
    _oracle(image_dir, tmp_path, ".safetensors", (2, -1), model="timm:test_vit", random_init=True, workers=0,
            pool="mean", strategy="anyres", grid_pinpoints="160x320,320x160", limit=2)


@pytest.mark.slow
def test_each_layer_of_a_hub_clip_equals_its_own_run_from_a_recipe(image_dir, tmp_path, hub):
    """An S² recipe that sets --layers (and the CLS token kept, so prefix tokens go through the merge too)."""
    model = _clip_repo(hub, tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"config:\n  model: {model}\n  img_sizes: [32, 64]\n  keep_cls: true\n  layers: '-1:-2,1'\n")
    res = s2cli.settings(str(image_dir), "o.h5", recipe=str(recipe))
    assert res.layers == (-1, -2, 1) and dict(res.provenance)["layers"] == "recipe"
    _oracle(image_dir, tmp_path, "/", (-1, -2, 1), flag=False, recipe=str(recipe), pool="cls", workers=0, limit=2)


@pytest.mark.slow
def test_each_layer_of_a_hub_clip_equals_its_own_run_dynamic_s2(image_dir, tmp_path, hub):
    model = _clip_repo(hub, tmp_path)
    _oracle(image_dir, tmp_path, ".h5", (1, -2), model=model, strategy="dynamic-s2", img_sizes=(32, 64), pool="mean",
            workers=0)


@pytest.mark.slow
def test_flops_count_to_the_deepest_layer_and_bytes_scale_with_the_layers(image_dir, tmp_path, hub):
    model = _clip_repo(hub, tmp_path)
    plan = lambda **o: s2cli.plan(str(image_dir), "o.h5", model=model, img_sizes=(32, 64), **o)  # noqa: E731
    one, deep, two = plan(layer=1), plan(layer=-1), plan(layers="1,-1")
    assert two["flops_estimate"] == deep["flops_estimate"] > one["flops_estimate"]
    assert two["total_bytes"] == 2 * one["total_bytes"]
    assert plan(layers="1:2")["flops_estimate"] == plan(layer=2)["flops_estimate"]


def test_wrong_layers_are_one_line_before_weights_load(image_dir, tmp_path, hub):
    model = _clip_repo(hub, tmp_path)
    for opts, why in ((dict(layer=-1, layers="-1,-2"), "both given"), (dict(layers="-1,7"), "out of range"),
                      (dict(layers="-1,-2", model="timm:test_resnet", img_sizes=(64,)), "ConvNet"),
                      (dict(layers="-1,-2", pool="embed"), "pool embed")):
        with pytest.raises(ConfigError, match=why):
            s2cli.settings(str(image_dir), "o.h5", **{"model": model, **opts})


@pytest.mark.slow
def test_readers_dataset_export_and_hf_pick_a_layer(image_dir, tmp_path):
    from s2cli.dataset import FeatureDataset
    from s2cli.export import export_embeddings
    from s2cli.hf import to_hf_dataset

    opts = dict(model="timm:test_vit", random_init=True, img_sizes=(160,), workers=0, pool="mean", shard_size=3)
    s2cli.extract(str(image_dir), str(tmp_path / "multi/"), layers="2,-1", **opts)
    s2cli.extract(str(image_dir), str(tmp_path / "one/"), layer=2, **opts)
    one, multi = open_features(tmp_path / "one"), open_features(tmp_path / "multi", layer=2)
    info = summary(open_features(tmp_path / "multi"))
    assert info["layers"] == [2, -1] and info["feature_shape"] == [2, 101, 64] and info["num_shards"] == 2
    assert summary(one)["layers"] is None and multi.feature_shape == one.feature_shape == [101, 64]
    keys = list(one)
    # FeatureDataset
    a, b = FeatureDataset(tmp_path / "one"), FeatureDataset(tmp_path / "multi", layer=2)
    assert all(torch.equal(a[i]["features"], b[i]["features"]) for i in range(len(keys)))
    pa, pb = FeatureDataset(tmp_path / "one", what="pooled"), FeatureDataset(tmp_path / "multi", what="pooled")
    assert pb[0]["features"].shape == (2, 64) and torch.equal(pb[0]["features"][0], pa[0]["features"])
    # export: the picked layer's vectors; all layers: each layer's, side by side
    for how in ("pooled", "mean"):
        e1 = export_embeddings(one, tmp_path / f"e1{how}", pool=how, normalize=False, dtype="float32")
        e2 = export_embeddings(multi, tmp_path / f"e2{how}", pool=how, normalize=False, dtype="float32")
        every = open_features(tmp_path / "multi")
        e3 = export_embeddings(every, tmp_path / f"e3{how}", pool=how, normalize=False, dtype="float32")
        v1, v2, v3 = (np.load(tmp_path / d / "img_emb" / "img_emb_0.npy") for d in (f"e1{how}", f"e2{how}", f"e3{how}"))
        assert e1["dim"] == e2["dim"] == 64 and e3["dim"] == 128
        np.testing.assert_allclose(v2, v1, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(v3[:, :64], v1, rtol=1e-5, atol=1e-6)
    # to_hf_dataset
    ds1 = to_hf_dataset(tmp_path / "one", cache_dir=tmp_path / "c1").with_format("numpy")[:]
    ds2 = to_hf_dataset(tmp_path / "multi", cache_dir=tmp_path / "c2", layer=2).with_format("numpy")[:]
    ds3 = to_hf_dataset(tmp_path / "multi", cache_dir=tmp_path / "c3").with_format("numpy")[:]
    np.testing.assert_array_equal(ds2["features"], ds1["features"])
    np.testing.assert_array_equal(ds2["pooled"], ds1["pooled"])
    assert ds3["features"].shape == (len(keys), 2, 101, 64) and ds3["pooled"].shape == (len(keys), 2, 64)
    np.testing.assert_array_equal(ds3["features"][:, 0], ds1["features"])
    # a layer that is not stored, or layer= on an output of one layer
    with pytest.raises(ConfigError, match="not stored"):
        open_features(tmp_path / "multi", layer=-2)
    with pytest.raises(ConfigError, match="stores one layer"):
        open_features(tmp_path / "one", layer=-1)
    assert open_features(tmp_path / "one", layer=2).feature_shape == [101, 64]


@pytest.mark.slow
def test_a_resume_with_other_layers_is_refused(image_dir, tmp_path):
    opts = dict(model="timm:test_vit", random_init=True, img_sizes=(160,), workers=0)
    s2cli.extract(str(image_dir), str(tmp_path / "o/"), layers="-1,-2", **opts)
    s2cli.extract(str(image_dir), str(tmp_path / "o/"), layers="-1,-2", **opts)  # the same: resumes (nothing to do)
    with pytest.raises(ConfigError, match="layers"):
        s2cli.extract(str(image_dir), str(tmp_path / "o/"), layers="-1", **opts)


@pytest.mark.slow
def test_the_cli_takes_layers_and_inspect_and_export_pick_one(image_dir, tmp_path, cli):
    out = tmp_path / "o.h5"
    r = cli("extract", str(image_dir), "-o", str(out), "--model", "timm:test_vit", "--random-init", "--img-sizes",
            "160", "-j", "0", "--layers=-2:-1", "--pool", "mean", "-q")
    assert r.exit_code == 0, r.output
    r = cli("inspect", str(out), "--json")
    assert json.loads(r.stdout)["layers"] == [-2, -1]
    r = cli("inspect", str(out), "--key", "a", "--layer", "-1", "--json")
    assert json.loads(r.stdout)["shape"] == [101, 64]
    r = cli("export", str(out), "-o", str(tmp_path / "e"), "--layer", "-2", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["dim"] == 64
    r = cli("viz", "features", str(out), "--key", "a", "-o", str(tmp_path / "p.png"))
    assert r.exit_code == 2 and "--layer -2" in r.output
    r = cli("viz", "features", str(out), "--key", "a", "--layer", "-1", "-o", str(tmp_path / "p.png"))
    assert r.exit_code == 0 and (tmp_path / "p.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["int8", "float16"])
def test_dry_run_bytes_of_several_layers_are_the_stored_bytes_quantized_too(image_dir, tmp_path, dtype):
    """int8: an image's layers are L x T rows, each with its token scale, beside the channel scales."""
    import h5py

    opts = dict(model="timm:test_vit", random_init=True, img_sizes=(160,), workers=0, pool="mean", dtype=dtype)
    s2cli.extract(str(image_dir), str(tmp_path / "o.h5"), layers="-1,2", **opts)
    plan = s2cli.plan(str(image_dir), str(tmp_path / "o.h5"), layers="-1,2", **opts)
    with h5py.File(tmp_path / "o.h5") as f:
        stored = sum(f[n].nbytes for n in ("features", "pooled", "token_scales", "channel_scales") if n in f)
    assert plan["total_bytes"] == stored


@pytest.mark.slow
def test_one_forward_to_the_deepest_layer_keeps_only_the_listed_ones(hub, tmp_path):
    """The backbone of --layers 1,2 (of 3): one call of the model, the layer above dropped, no hidden_states asked
    for; its output is the two layers side by side, as the model's own hidden states give them (CLS dropped)."""
    from transformers import CLIPVisionModel

    from s2cli.backbones import load_backbone, resolve

    model = _clip_repo(hub, tmp_path)
    bb = load_backbone(resolve(model, layer=2), layers=[1, 2])
    calls: list[dict] = []
    bb.module.register_forward_hook(lambda m, a, kw, out: calls.append(kw), with_kwargs=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = bb(x)
        states = CLIPVisionModel.from_pretrained(tmp_path / "clip")(pixel_values=x, output_hidden_states=True).hidden_states
    assert len(calls) == 1 and not calls[0].get("output_hidden_states")
    assert sum(isinstance(m, torch.nn.ModuleList) and len(m) == 2 for m in bb.module.modules()) == 1  # 3 -> 2 layers
    torch.testing.assert_close(got, torch.cat([states[1][:, 1:], states[2][:, 1:]], dim=-1), atol=1e-5, rtol=1e-5)
