"""The `open_clip:` family: open_clip_torch's CLIP models with a ViT image tower, as clip-retrieval names them:
`open_clip:ViT-B-32` (a built-in config; weights by --weights or --random-init), `open_clip:ViT-B-32/laion2b_s34b_b79k`
(a pretrained tag: its hub repo's weights) and `open_clip:hf-hub:org/name[@revision]` (the repo's
open_clip_config.json). Described from the model config (width, layers, patch) and its preprocess config (mean,
std, size, resize mode) without building it; built by `open_clip.create_model`, weights loaded by open_clip's
`load_checkpoint`; run to chosen layers with the tower's `forward_intermediates` (blocks above pruned)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from .. import hub
from .._lazy import nn, torch
from ..errors import ConfigError, WeightsNotFoundError
from ..weights import Located
from .base import CLIP_MEAN, CLIP_STD, BackboneCfg, Family, LayersFn, hidden_index, register_family

NAME = "open_clip"
HF_HUB = "hf-hub:"
CONFIG = "open_clip_config.json"
WEIGHTS = "open_clip_pytorch_model.bin"  # open_clip's default file name in a repo (its safetensors twin preferred)
# open_clip's resize modes as s2cli's fits: shortest edge + center crop, a square resize, the longest edge + pad
RESIZE_MODES = {"shortest": "crop", "squash": "squash", "longest": "pad"}


def _configs(spec: str, rest: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """(model_cfg, preprocess_cfg, where its weights are) of an `open_clip:` spec, from open_clip's built-in
    configs and pretrained tags, or from a hub repo's open_clip_config.json (downloaded on first use)."""
    if rest.startswith(HF_HUB):
        ref = hub.parse_ref(rest[len(HF_HUB):], spec)
        snap = hub.ensure(ref, what=spec, weights=False, config=CONFIG)
        full = json.loads((snap.path / CONFIG).read_text())
        if "model_cfg" not in full:
            raise ConfigError(f"{CONFIG} of {ref} has no model_cfg", given=spec,
                              fix="pass an open_clip repo (open_clip.push_to_hf_hub writes model_cfg and preprocess_cfg)")
        return full["model_cfg"], full.get("preprocess_cfg", {}), {"hub_id": ref.repo, "hub_file": WEIGHTS,
                                                                   "revision": snap.sha, "source": f"local-dir:{snap.path}"}
    import open_clip

    arch, _, tag = rest.partition("/")
    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        raise ConfigError("open_clip has no such model", given=arch,
                          fix="list names with `python -c \"import open_clip; print(open_clip.list_models())\"`")
    if not tag:
        return model_cfg, {}, {"source": arch}
    pre = open_clip.get_pretrained_cfg(arch, tag)
    if not pre:
        raise ConfigError(f"open_clip has no pretrained tag {tag} for {arch}", given=rest,
                          expected=", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "no tags",
                          fix="pick one of its tags, or pass --weights PATH")
    repo = (pre.get("hf_hub") or "").strip("/")
    if not repo:
        raise WeightsNotFoundError(f"the weights of {rest} are published by URL, not on the hub", given=spec,
                                   fix=f"download {pre.get('url') or 'them'} and pass --weights PATH")
    return model_cfg, pre, {"hub_id": repo, "hub_file": pre.get("hf_hub_filename") or WEIGHTS, "source": arch}


def _describe(spec: str, rest: str, layer: int | None, keep_cls: bool) -> BackboneCfg:
    model_cfg, pre, where = _configs(spec, rest)
    vc = model_cfg.get("vision_cfg", {})
    if "timm_model_name" in vc or isinstance(vc.get("layers"), (list, tuple)):
        raise ConfigError("this open_clip model's image tower is not open_clip's ViT (a timm or ResNet tower)",
                          given=spec, expected="an open_clip ViT model (ViT-B-32, ViT-L-14, ViT-H-14, ...)",
                          fix="use its timm:<name> model for a timm tower")
    if vc.get("attentional_pool") or vc.get("pool_type", "tok") != "tok":
        raise ConfigError("this open_clip ViT has no class token to drop or keep (attentional or mean pooling)",
                          given=spec, fix="use a CLIP ViT of open_clip (ViT-B-32, ViT-L-14, ...)")
    size = pre.get("size") or vc.get("image_size", 224)
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    patch, width, layers = int(vc.get("patch_size", 16)), int(vc.get("width", 768)), int(vc.get("layers", 12))
    mode = pre.get("resize_mode", "shortest")
    if mode not in RESIZE_MODES:
        raise ConfigError("open_clip resize mode is not known", given=mode, expected=" | ".join(RESIZE_MODES),
                          fix="set preprocess_cfg.resize_mode in open_clip_config.json")
    return BackboneCfg(
        name=spec, family=NAME, source=where.pop("source"), input_size=size, patch_size=patch, channels=width,
        num_prefix_tokens=int(keep_cls), layer=-2 if layer is None else layer, output_shape="bnc",
        mean=tuple(pre.get("mean", CLIP_MEAN)), std=tuple(pre.get("std", CLIP_STD)), fit=RESIZE_MODES[mode],
        crop_round="half-even",  # its transforms crop with torchvision's CenterCrop
        description=f"open_clip {rest}", model_type=rest.partition("/")[0], drops_cls=not keep_cls,
        hf_config=dict(hidden_size=width, num_hidden_layers=layers, mlp_ratio=float(vc.get("mlp_ratio", 4.0)),
                       embed_dim=int(model_cfg.get("embed_dim", 0))), **where)


def _build(cfg: BackboneCfg, loc: Located) -> nn.Module:
    """The whole open_clip model (its text tower embeds queries); weights by open_clip's own `load_checkpoint`."""
    import open_clip

    model = open_clip.create_model(cfg.source, load_weights=False)
    path = None
    if loc.kind == "hub":
        path = Path(loc.path) / str(loc.file)
    elif loc.kind in ("file", "dir"):
        path = Path(loc.path)
        if path.is_dir():
            files = hub.cached_weights(path, WEIGHTS)
            if not files:
                raise WeightsNotFoundError(f"no open_clip weights in {path}", given=str(path),
                                           fix="pass the checkpoint file itself with --weights")
            path = path / files[0]
    if path is not None:
        try:
            open_clip.load_checkpoint(model, str(path))
        except Exception as e:
            raise ConfigError(f"checkpoint {path} does not load into {cfg.name}: {type(e).__name__}: "
                              f"{(str(e).strip().splitlines() or [''])[0][:200]}",
                              fix="pass a checkpoint saved from the same open_clip model") from None
    return model.eval()


def _forward(model: nn.Module, cfg: BackboneCfg, layers: Sequence[int], embed: bool = False) -> LayersFn:
    """The tower's residual stream after the chosen blocks (CLS first; -1: the last block, before ln_post, as
    HF CLIP's last_hidden_state); `embed`: then encode_image's embedding from the same forward. Without `embed`,
    the blocks above the highest layer asked for, ln_post and proj are pruned."""
    tower = model.visual
    block = {layer: hidden_index(layer, len(tower.transformer.resblocks)) - 1 for layer in layers}
    take = sorted(set(block.values()))
    if not embed:
        tower.prune_intermediate_layers(take, prune_norm=True, prune_head=True)
    start = 1 if cfg.drops_cls else 0

    def run(x: torch.Tensor) -> list[torch.Tensor]:
        out = tower.forward_intermediates(x, indices=take, output_fmt="NLC", intermediates_only=not embed,
                                          output_extra_tokens=True)
        got = {i: torch.cat([p, s], 1)[:, start:] for i, s, p in
               zip(take, out["image_intermediates"], out["image_intermediates_prefix"])}
        return [got[block[layer]] for layer in layers] + ([out["image_features"]] if embed else [])

    return run


def _text_embedder(model: nn.Module, cfg: BackboneCfg):
    import open_clip

    tokenizer = open_clip.get_tokenizer(cfg.source)

    def embed(texts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return model.encode_text(tokenizer(list(texts)).to(next(model.parameters()).device))

    return embed


class OpenClip(Family):
    name = NAME

    def describe(self, spec: str, rest: str, *, layer: int | None, keep_cls: bool) -> BackboneCfg:
        return _describe(spec, rest, layer, keep_cls)

    def build(self, cfg: BackboneCfg, loc: Located, any_size: bool) -> nn.Module:
        return _build(cfg, loc)

    def forward(self, module: nn.Module, cfg: BackboneCfg, layers: Sequence[int]) -> LayersFn:
        return _forward(module, cfg, layers)

    def embed_dim(self, cfg: BackboneCfg) -> int | None:
        return cfg.hf_config.get("embed_dim") or None

    def build_embedding(self, cfg: BackboneCfg, loc: Located, any_size: bool) -> nn.Module:
        return _build(cfg, loc)

    def forward_embedding(self, module: nn.Module, cfg: BackboneCfg, layers: Sequence[int]) -> LayersFn:
        return _forward(module, cfg, layers, embed=True)

    def text_embedder(self, module: nn.Module, cfg: BackboneCfg):
        return _text_embedder(module, cfg)

    def hub_target(self, spec: str, rest: str) -> tuple[hub.Ref, str | None, str | None] | None:
        return (hub.parse_ref(rest[len(HF_HUB):], spec), WEIGHTS, CONFIG) if rest.startswith(HF_HUB) else None

    def hub_config(self, cfg: BackboneCfg) -> str | None:
        return CONFIG if cfg.source.startswith("local-dir:") else None  # a tag's repo: its weights file only

    def any_size(self, cfg: BackboneCfg) -> bool:
        return False  # a learned position embedding of one grid size


register_family(OpenClip())

