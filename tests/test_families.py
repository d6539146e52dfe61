"""Any transformers vision backbone, described from its config and image-processor config and loaded through the
real `from_pretrained` path from the (loopback) hub: CLIP, SigLIP, SigLIP2 (NaFlex patches), DINOv2 with
registers, ViT, and the ConvNets ConvNeXt and ResNet (bchw maps). Each one's features equal its own model's output
on the same pixels."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY, tiny_open_clip
from s2cli.backbones import load_backbone, resolve

TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)


def _clip():
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    model = CLIPModel(CLIPConfig(vision_config=TINY, text_config=TEXT, projection_dim=16))
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    ref = lambda x: model.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]  # noqa: E731
    return model, proc, ref, dict(input_size=32, patch_size=8, num_prefix_tokens=0, layer=-2, fit="crop",
                                  output_shape="bnc", channels=32, mean=(0.48145466, 0.4578275, 0.40821073))


def _siglip():
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    model = SiglipModel(SiglipConfig(vision_config=TINY, text_config=TEXT))
    proc = SiglipImageProcessor(size={"height": 32, "width": 32})
    ref = lambda x: model.vision_model(pixel_values=x).last_hidden_state  # noqa: E731
    return model, proc, ref, dict(input_size=32, patch_size=8, num_prefix_tokens=0, layer=-1, fit="squash",
                                  output_shape="bnc", channels=32, mean=(0.5, 0.5, 0.5))


def _siglip2():
    from transformers import Siglip2Config, Siglip2ImageProcessor, Siglip2Model

    model = Siglip2Model(Siglip2Config(vision_config={**TINY, "num_patches": 16}, text_config=TEXT))
    proc = Siglip2ImageProcessor(patch_size=8, max_num_patches=16)

    def ref(x):  # the processor's own patches of the same pixels (x is normalized with mean = std = 0.5)
        img = ((x[0] * 0.5 + 0.5) * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        inputs = proc(images=[img], return_tensors="pt")
        return model.vision_model(**{k: inputs[k] for k in ("pixel_values", "pixel_attention_mask", "spatial_shapes")}).last_hidden_state

    return model, proc, ref, dict(input_size=32, patch_size=8, num_prefix_tokens=0, layer=-1, fit="squash",
                                  output_shape="bnc", channels=32, mean=(0.5, 0.5, 0.5))


def _dinov2_registers():
    from transformers import BitImageProcessor, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                               patch_size=8, image_size=32, num_register_tokens=4))
    proc = BitImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}, do_center_crop=True,
                             image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    ref = lambda x: model(pixel_values=x).last_hidden_state  # noqa: E731
    return model, proc, ref, dict(input_size=32, patch_size=8, num_prefix_tokens=5, layer=-1, fit="crop",
                                  output_shape="bnc", channels=32, mean=(0.485, 0.456, 0.406))


def _vit():
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    model = ViTModel(ViTConfig(**TINY))
    proc = ViTImageProcessor(size={"height": 32, "width": 32})
    ref = lambda x: model(pixel_values=x).last_hidden_state  # noqa: E731
    return model, proc, ref, dict(input_size=32, patch_size=8, num_prefix_tokens=1, layer=-1, fit="squash",
                                  output_shape="bnc", channels=32, mean=(0.5, 0.5, 0.5))


def _convnext():
    from transformers import ConvNextConfig, ConvNextImageProcessor, ConvNextModel

    model = ConvNextModel(ConvNextConfig(hidden_sizes=[8, 16, 24, 40], depths=[1, 1, 1, 1], image_size=64))
    proc = ConvNextImageProcessor(size={"shortest_edge": 64}, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    ref = lambda x: model(pixel_values=x).last_hidden_state  # noqa: E731
    return model, proc, ref, dict(input_size=64, patch_size=32, num_prefix_tokens=0, layer=-1, fit="crop",
                                  output_shape="bchw", channels=40, mean=(0.485, 0.456, 0.406))


def _resnet():
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetModel

    model = ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24, 40], depths=[1, 1, 1, 1]))
    proc = ConvNextImageProcessor(size={"shortest_edge": 64})
    ref = lambda x: model(pixel_values=x).last_hidden_state  # noqa: E731
    return model, proc, ref, dict(input_size=64, patch_size=32, num_prefix_tokens=0, layer=-1, fit="crop",
                                  output_shape="bchw", channels=40)


FAMILIES = {"clip": _clip, "siglip": _siglip, "siglip2": _siglip2, "dinov2-registers": _dinov2_registers,
            "vit": _vit, "convnext": _convnext, "resnet": _resnet}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_transformers_backbone_is_described_from_its_config_and_loads_from_the_hub(family, hub, tmp_path):
    torch.manual_seed(0)
    model, proc, ref, expect = FAMILIES[family]()
    model.eval().save_pretrained(tmp_path / family)
    proc.save_pretrained(tmp_path / family)
    sha = hub.add(f"org/tiny-{family}", tmp_path / family)
    cfg = resolve(f"hf:org/tiny-{family}")
    got = {k: getattr(cfg, k) for k in expect}
    if "mean" in got:
        got["mean"] = tuple(round(v, 8) for v in got["mean"])
    assert got == expect and cfg.revision == sha and cfg.hub_id == f"org/tiny-{family}"
    bb = load_backbone(cfg)
    assert bb.weights == f"org/tiny-{family}@{sha}"
    side = cfg.input_size
    x = (torch.randint(0, 256, (1, 3, side, side)).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        out, expected = bb(x), ref(x)
    assert tuple(out.shape[-2:] if cfg.output_shape == "bchw" else out.shape[1:2]) == (
        cfg.feature_hw((side, side)) if cfg.output_shape == "bchw" else (np.prod(cfg.feature_hw((side, side))) + cfg.num_prefix_tokens,))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert cfg.flops_per_tile() is not None and cfg.flops_per_tile() > 0


def test_a_convnet_stage_is_a_layer(hub, tmp_path):
    torch.manual_seed(0)
    model, proc, _, _ = _convnext()
    model.eval().save_pretrained(tmp_path / "c")
    hub.add("org/tiny-convnext", tmp_path / "c")
    cfg = resolve("hf:org/tiny-convnext", layer=-2)
    assert (cfg.channels, cfg.patch_size, cfg.output_shape) == (24, 16, "bchw")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(load_backbone(cfg)(x), model(pixel_values=x, output_hidden_states=True).hidden_states[-2])


def test_a_model_that_is_not_a_vision_backbone_is_one_line(hub, tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=99)).save_pretrained(tmp_path / "bert")
    hub.add("org/tiny-bert", tmp_path / "bert")
    with pytest.raises(Exception) as e:
        resolve("hf:org/tiny-bert")
    assert type(e.value).__name__ == "ConfigError" and "not a vision backbone" in str(e.value)
    assert "\n" not in str(e.value)


def test_timm_models_download_their_pretrained_weights_on_first_use(hub, tmp_path, monkeypatch):
    """`timm:<name>` (its pretrained tag's hub repo) and `timm:hf-hub:org/name` (the repo's own config) come from
    the hub like any other model, and are loaded by timm's own pretrained loading."""
    import timm
    from timm.models._hub import save_for_hf

    torch.manual_seed(0)
    src = timm.create_model("test_vit", pretrained=False).eval()
    save_for_hf(src, str(tmp_path / "tv"), safe_serialization="both")
    sha = hub.add("timm/test_vit.r160_in1k", tmp_path / "tv")
    cfg = resolve("timm:test_vit")
    assert cfg.hub_id == "timm/test_vit.r160_in1k"
    bb = load_backbone(cfg)
    assert bb.weights == f"timm/test_vit.r160_in1k@{sha}"
    assert {f for _, f in hub.downloads} == {"config.json", "model.safetensors"}  # not also pytorch_model.bin
    ref = src.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in bb.module.state_dict().items())

    sha2 = hub.add("org/tiny-timm", tmp_path / "tv", revision="v1")
    via_repo = resolve("timm:hf-hub:org/tiny-timm@v1")
    assert (via_repo.input_size, via_repo.patch_size, via_repo.channels, via_repo.num_prefix_tokens) == (
        cfg.input_size, cfg.patch_size, cfg.channels, cfg.num_prefix_tokens)
    bb2 = load_backbone(via_repo)
    assert bb2.weights == f"org/tiny-timm@{sha2}"
    assert all(torch.equal(v, ref[k]) for k, v in bb2.module.state_dict().items())
    x = torch.randn(1, 3, cfg.input_size, cfg.input_size)
    with torch.no_grad():
        torch.testing.assert_close(bb2(x), src.forward_features(x))
    # offline: both come from the cache; another tag's repo is a one-line miss
    hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load_backbone(resolve("timm:test_vit")).weights == bb.weights
    with pytest.raises(Exception, match="s2 fetch timm:test_resnet") as e:
        load_backbone(resolve("timm:test_resnet"))
    assert "\n" not in str(e.value)


class ToyFamily:
    """A backbone family written in a test: `toy:<channels>` is one patch-embedding convolution (patch 4, 16 px
    tiles), tokens (B, N, C) at its one layer."""

    name = "toy"

    def describe(self, spec, rest, *, layer, keep_cls):
        from s2cli.families import BackboneCfg

        return BackboneCfg(name=spec, family=self.name, source=rest, input_size=16, patch_size=4, channels=int(rest),
                           num_prefix_tokens=0, layer=-1 if layer is None else layer, output_shape="bnc",
                           mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), fit="squash", description="a toy family")

    def build(self, cfg, loc, any_size):
        assert loc.kind == "random"
        return torch.nn.Conv2d(3, cfg.channels, 4, stride=4)

    def forward(self, module, cfg, layers):
        assert list(layers) == [-1]
        return lambda x: [module(x).flatten(2).transpose(1, 2)]

    def hub_target(self, spec, rest):
        return None

    def hub_config(self, cfg):
        return None

    def local_dir(self, cfg):
        return False

    def any_size(self, cfg):
        return True


@pytest.fixture
def toy_family():
    from s2cli.families import register_family, unregister_family

    fam = register_family(ToyFamily())
    yield fam
    unregister_family(fam.name)


def test_a_family_registered_from_a_test_extracts_end_to_end(toy_family, image_dir, tmp_path):
    """The family seam: `toy:` is parsed, described, built, run by the engine, written and read back, and the
    native strategy asks the family whether it takes any size; nothing in the package names it."""
    import s2cli
    from s2cli.extractor import normalize_images

    out = tmp_path / "toy.h5"
    summary = s2cli.extract(str(image_dir), str(out), model="toy:8", scales=(1, 2), random_init=True, seed=4, workers=0)
    assert summary.num_images == 4 and summary.weights == "random-init(seed=4)"
    torch.manual_seed(4)
    conv = torch.nn.Conv2d(3, 8, 4, stride=4)
    with s2cli.open_features(out) as ff:
        assert ff["a"].shape == (16, 16) and ff.attrs["model"] == "toy:8"
        view = s2cli.views(image_dir / "a.png", model="toy:8", scales=(1, 2))[0]
        x = normalize_images(torch.from_numpy(view)[None], torch.full((3, 1, 1), 0.5), torch.full((3, 1, 1), 0.25),
                             torch.float32)
        with torch.no_grad():
            expect = s2cli.multiscale_forward(lambda t: conv(t).flatten(2).transpose(1, 2), x, img_sizes=[16, 32],
                                              max_split_size=16)[0]
        np.testing.assert_allclose(ff["a"], expect.numpy(), atol=1e-6, rtol=1e-6)
    plan = s2cli.plan(str(image_dir), model="toy:8", strategy="native")
    assert len(plan["images"]) == 4


def test_which_backbones_take_any_input_size_is_their_familys_answer():
    assert resolve("dinov2-l").any_size and resolve("efficientnet-lite0").any_size
    assert resolve("timm:vit_tiny_patch16_224").any_size and not resolve("clip-vit-l-336").any_size


@pytest.mark.parametrize("spec", ["timm:test_vit", "timm:test_resnet", "hf-clip", "open_clip"])
def test_a_family_returns_several_layers_from_one_forward(spec, clip_dir, hub, tmp_path):
    """The families' forward takes a list of layers (what --layers will ask): each equals a one-layer forward."""
    from s2cli.weights import locate

    if spec == "hf-clip":
        spec = f"hf:{clip_dir[0]}"
    elif spec == "open_clip":
        hub.add("org/tiny-openclip", tiny_open_clip(tmp_path / "oc"))
        spec = "open_clip:hf-hub:org/tiny-openclip"
    cfg = resolve(spec)
    layers = [-2, 1, -1] if cfg.output_shape == "bnc" else [-2, 0]
    torch.manual_seed(1)
    module = cfg.kind.build(cfg, locate(cfg, random_init=True, seed=1), False).eval()  # as built, nothing pruned
    fn = cfg.kind.forward(module, cfg, layers)
    x = torch.randn(2, 3, cfg.input_size, cfg.input_size)
    with torch.no_grad():
        got = fn(x)
        for layer, out in zip(layers, got):
            one = load_backbone(resolve(spec, layer=layer), random_init=True, seed=1)
            torch.testing.assert_close(out, one(x), atol=1e-6, rtol=1e-6)
    assert len(got) == len(layers)
