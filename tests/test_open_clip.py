"""The open_clip family: a tiny random-init open_clip model (a custom model config) published on the loopback hub
as open_clip.push_to_hf_hub lays a repo out (open_clip_config.json with model_cfg and preprocess_cfg, and the
weights) extracts through `-m open_clip:hf-hub:org/name`; its S² features equal `multiscale_forward` on the
model's own image tower, and its pixels equal open_clip's own preprocess transform on the example photos."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import s2cli
from conftest import EXAMPLES, OPEN_CLIP_MEAN, OPEN_CLIP_STD, invoke_json, tiny_open_clip
from s2cli import ConfigError, WeightsNotFoundError
from s2cli.backbones import load_backbone, resolve
from s2cli.extractor import normalize_images

MEAN, STD = OPEN_CLIP_MEAN, OPEN_CLIP_STD  # not CLIP's: the preprocess config is what is read


def reference(folder: Path):
    """The model and its eval transform as open_clip makes them from the folder."""
    import open_clip  # seconds to import: not at collection, which every xdist worker does for every module

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    return model.eval(), preprocess


def test_an_open_clip_repo_is_described_from_its_configs(hub, tmp_path):
    sha = hub.add("org/tiny-openclip", tiny_open_clip(tmp_path / "oc"))
    cfg = resolve("open_clip:hf-hub:org/tiny-openclip")
    assert (cfg.family, cfg.input_size, cfg.patch_size, cfg.channels, cfg.layer, cfg.num_prefix_tokens, cfg.fit) == (
        "open_clip", 64, 16, 32, -2, 0, "crop")
    assert cfg.mean == MEAN and cfg.std == STD and cfg.hub_id == "org/tiny-openclip" and cfg.revision == sha
    assert cfg.flops_per_tile() > 0 and not cfg.any_size
    assert resolve("open_clip:hf-hub:org/tiny-openclip", keep_cls=True).num_prefix_tokens == 1
    hub.add("org/tiny-openclip-squash", tiny_open_clip(tmp_path / "sq", resize_mode="squash"))
    assert resolve("open_clip:hf-hub:org/tiny-openclip-squash").fit == "squash"


def test_open_clip_extracts_through_its_spec_with_s2_parity(hub, tmp_path, image_dir):
    folder = tiny_open_clip(tmp_path / "oc", seed=3)
    sha = hub.add("org/tiny-openclip", folder)
    spec = "open_clip:hf-hub:org/tiny-openclip"
    summary = s2cli.extract(str(image_dir), str(tmp_path / "o.h5"), model=spec, scales=(1, 2), workers=0)
    assert summary.num_images == 4 and summary.weights == f"org/tiny-openclip@{sha}"
    model, _ = reference(folder)
    tower = model.visual

    def blocks(x):  # the image tower's tokens after its second-to-last block, CLS dropped (open_clip's own call)
        return tower.forward_intermediates(x, indices=[1], output_fmt="NLC", intermediates_only=True)["image_intermediates"][0]

    with s2cli.open_features(tmp_path / "o.h5") as ff:
        assert ff["a"].shape == (16, 64) and ff.attrs["model"] == spec
        for key, name in [("a", "a.png"), ("b", "b.jpg")]:
            view = s2cli.views(image_dir / name, model=spec, scales=(1, 2))[0]
            x = normalize_images(torch.from_numpy(view)[None], torch.tensor(MEAN).view(3, 1, 1),
                                 torch.tensor(STD).view(3, 1, 1), torch.float32)
            with torch.no_grad():
                expect = s2cli.multiscale_forward(blocks, x, img_sizes=[64, 128], max_split_size=64)[0]
            np.testing.assert_allclose(ff[key], expect.numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("resize_mode", ["shortest", "squash"])
def test_pixels_equal_open_clips_own_preprocess_on_the_example_photos(hub, tmp_path, resize_mode):
    """Exactly equal on every example photo, among them sizes where torchvision's center crop (open_clip's, its
    offset rounded half to even) starts one pixel after transformers' (the margin halved, floored)."""
    from PIL import Image

    folder = tiny_open_clip(tmp_path / "oc", resize_mode=resize_mode)
    hub.add("org/tiny-openclip", folder)
    _, preprocess = reference(folder)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    odd = []
    for photo in sorted(EXAMPLES.iterdir()):
        view = s2cli.views(photo, model="open_clip:hf-hub:org/tiny-openclip", scales=(1,))[0]
        ours = normalize_images(torch.from_numpy(view), mean, std, torch.float32)
        theirs = preprocess(Image.open(photo).convert("RGB"))
        assert torch.equal(ours, theirs), photo.name
        w, h = Image.open(photo).size
        odd.append((int(64 * max(w, h) / min(w, h)) - 64) % 4 == 3)  # where the two roundings part
    assert resize_mode == "squash" or any(odd)  # the photos hold such a size: the rounding is put to the test


def test_fetch_brings_an_open_clip_repos_config_and_weights(hub, tmp_path, cli):
    folder = tiny_open_clip(tmp_path / "oc")
    torch.save({"unused": torch.zeros(1)}, folder / "pytorch_model.bin")  # a transformers twin the family must not take
    sha = hub.add("org/tiny-openclip", folder)
    out = invoke_json(cli, "fetch", "open_clip:hf-hub:org/tiny-openclip", "--json")
    assert out[0]["revision"] == f"org/tiny-openclip@{sha}"
    assert {f for _, f in hub.downloads} == {"open_clip_config.json", "open_clip_model.safetensors"}


def test_open_clip_names_and_tags(tmp_path):
    cfg = resolve("open_clip:ViT-B-32")
    assert (cfg.input_size, cfg.patch_size, cfg.channels, cfg.layer, cfg.hub_id) == (224, 32, 768, -2, "")
    with pytest.raises(WeightsNotFoundError, match="--random-init"):
        load_backbone(cfg)
    tagged = resolve("open_clip:ViT-B-32/laion2b_s34b_b79k")
    assert tagged.hub_id == "laion/CLIP-ViT-B-32-laion2B-s34B-b79K" and tagged.hub_file == "open_clip_pytorch_model.bin"
    with pytest.raises(ConfigError, match="no pretrained tag"):
        resolve("open_clip:ViT-B-32/not_a_tag")
    with pytest.raises(ConfigError, match="open_clip has no such model"):
        resolve("open_clip:ViT-Z-99")
    with pytest.raises(ConfigError, match="not open_clip's ViT"):
        resolve("open_clip:RN50")
