"""--weights takes checkpoints as users have them (timm's `load_checkpoint` rules): plain, nested under
`state_dict` or `model`, DDP `module.` prefixes, EMA `state_dict_ema`; .safetensors or .pth; a checkpoint of the
bare tower or of a wrapper; a real mismatch names the first missing and unexpected keys."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from conftest import TINY
from s2cli import ConfigError
from s2cli.backbones import load_backbone, resolve


def _ddp(sd):
    return {f"module.{k}": v for k, v in sd.items()}


SHAPES = {  # name -> (what the file holds, given the model's state dict and another one)
    "plain": lambda sd, other: sd,
    "state_dict": lambda sd, other: {"state_dict": sd, "epoch": 3},
    "model": lambda sd, other: {"model": sd, "optimizer": {"lr": 0.1}},
    "ddp": lambda sd, other: _ddp(sd),
    "ddp in state_dict": lambda sd, other: {"state_dict": _ddp(sd), "epoch": 3},
    "ema": lambda sd, other: {"state_dict": other, "state_dict_ema": sd},  # EMA weights win, as in timm
    "ddp ema": lambda sd, other: {"state_dict": _ddp(other), "state_dict_ema": _ddp(sd)},
}


def _save(obj, path):
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
    else:
        torch.save(obj, path)
    return path


@pytest.mark.parametrize("shape,suffix", [(s, ".pth") for s in SHAPES] + [("plain", ".safetensors"), ("ddp", ".safetensors")])
def test_timm_checkpoints_as_users_have_them_load(tmp_path, shape, suffix):
    cfg = resolve("timm:test_vit")
    src = load_backbone(cfg, random_init=True, seed=3).module.state_dict()
    other = load_backbone(cfg, random_init=True, seed=4).module.state_dict()
    path = _save(SHAPES[shape](src, other), tmp_path / f"ckpt{suffix}")
    got = load_backbone(cfg, weights=str(path)).module.state_dict()
    assert got.keys() == src.keys() and all(torch.equal(got[k], src[k]) for k in src)


@pytest.mark.parametrize("shape", ["plain", "ddp", "ema", "bare tower", "full two-tower"])
def test_hf_checkpoints_as_users_have_them_load(tmp_path, clip_dir, shape):
    from transformers import CLIPConfig, CLIPModel

    path, ref = clip_dir
    sd = ref.state_dict()
    tower = {k.removeprefix("vision_model."): v for k, v in sd.items()}  # CLIPVisionTransformer's own names
    if shape == "bare tower":  # the other layout of transformers' versions: `vision_model.` prefixed, or not
        obj = tower if tower.keys() != sd.keys() else {f"vision_model.{k}": v for k, v in sd.items()}
    elif shape == "full two-tower":  # a CLIPModel's state dict: the text tower and projections are not used
        full = CLIPModel(CLIPConfig(vision_config=TINY, text_config=dict(hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=2, vocab_size=99), projection_dim=16))
        full.vision_model.load_state_dict(tower)
        obj = full.state_dict()
    else:
        obj = SHAPES[shape](sd, {k: torch.zeros_like(v) for k, v in sd.items()})
    ckpt = _save(obj, tmp_path / "w.pth")
    bb = load_backbone(resolve(f"hf:{path}"), weights=str(ckpt))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expect = ref(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(bb(x), expect, atol=1e-5, rtol=1e-5)


def test_a_real_mismatch_names_the_first_missing_and_unexpected_keys(tmp_path):
    other = load_backbone(resolve("timm:test_resnet"), random_init=True).module.state_dict()
    path = _save(_ddp(other), tmp_path / "resnet.pth")
    with pytest.raises(ConfigError) as e:
        load_backbone(resolve("timm:test_vit"), weights=str(path))
    msg = str(e.value)
    assert "\n" not in msg and "does not match timm:test_vit" in msg
    # the DDP prefix was removed before comparing: what is listed is the real difference
    assert "keys missing (first: cls_token, pos_embed, patch_embed.proj.weight)" in msg
    assert "unexpected (first: conv1.0.weight, conv1.1.weight, conv1.1.bias)" in msg


def test_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path):
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read the checkpoint") as e:
        load_backbone(resolve("timm:test_vit"), weights=str(tmp_path / "notes.pth"))
    assert "\n" not in str(e.value)
