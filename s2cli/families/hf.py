"""The `hf:` family: any transformers vision backbone (a hub id `hf:org/name[@revision]` or a save_pretrained
folder `hf:/path`), described from its config.json and preprocessor_config.json (traced once on PyTorch's meta
device: token grid, prefix tokens, channels, FLOPs), loaded through transformers' own `from_pretrained`, run to
chosen layers with forward hooks (the layers above are dropped); and the CLIP, SigLIP and DINOv2 aliases."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .. import hub
from .._lazy import nn, torch
from ..errors import ConfigError, WeightsNotFoundError
from ..weights import Located, load_into, read_checkpoint, unused_key
from .base import (
    CLIP_MEAN,
    CLIP_STD,
    HALF,
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneCfg,
    Family,
    LayersFn,
    aliases,
    hidden_index,
    register_alias,
    register_family,
)

NAME = "hf"


# ---- describing a checkpoint from its configs ------------------------------------------------------------------
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


Traced = tuple[tuple[int, ...], float] | None
_TRACED: dict[tuple[type, str, str], Traced] = {}
# what names a model, not what it computes: two folders holding the same config trace the same
_NAMING = dict(name="", source="", description="", hub_id="", hub_file="", revision="")


def _hf_trace(cls: type, conf: Any, cfg: BackboneCfg) -> Traced:
    """The output's shape and FLOPs of one tile through `cfg`'s forward (None: the model cannot run on the meta
    device), traced once per process for a class, config and forward: describing the same model again (each
    settings, plan or extract call does) costs no second trace."""
    key = (cls, conf.to_json_string(), repr(dataclasses.replace(cfg, **_NAMING)))
    if key not in _TRACED:
        if len(_TRACED) >= 64:
            _TRACED.clear()
        _TRACED[key] = _trace_once(cls, conf, cfg)
    return _TRACED[key]


def _trace_once(cls: type, conf: Any, cfg: BackboneCfg) -> Traced:
    """Build the model on the meta device (no memory, no weights) and run one tile through `cfg`'s forward."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.device("meta"):
            model = cls(conf).eval()
        fn = _hf_forward(model, cfg, [cfg.layer])
        x = torch.empty(1, 3, cfg.input_size, cfg.input_size, device="meta")
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            out = fn(x)[0]
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
        name=name, family=NAME, source=src, input_size=size, patch_size=patch, channels=int(vc.get("hidden_size", 0)),
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


# ---- running to chosen layers ------------------------------------------------------------------------------------
def _find_layer_list(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    for mod_name, mod in model.named_modules():
        if mod_name.endswith("encoder") and isinstance(getattr(mod, "layers", None), nn.ModuleList):
            return mod, "layers", mod.layers
        if mod_name.endswith("encoder") and isinstance(getattr(mod, "layer", None), nn.ModuleList):
            return mod, "layer", mod.layer
    raise ConfigError("cannot find the encoder layers of this HF model", given=type(model).__name__,
                      fix="use --layer -1 (the model's final features)")


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


def _stage_maps(model: nn.Module, inputs: Callable, layers: list[int]) -> LayersFn:
    """A ConvNet's maps: -1 its last_hidden_state, else its hidden_states (the embeddings, then each stage)."""
    def body(x: torch.Tensor) -> list[torch.Tensor]:
        out = model(**inputs(x), output_hidden_states=layers != [-1])
        states = out.hidden_states or ()
        for layer in layers:
            if layer != -1 and not -len(states) <= layer < len(states):
                raise ConfigError("layer is out of range", given=layer, expected=f"-{len(states)}..{len(states) - 1}",
                                  fix="pass --layer -1 (the last stage)")
        return [out.last_hidden_state if layer == -1 else states[layer] for layer in layers]

    return body


def _hooked_tokens(model: nn.Module, inputs: Callable, layers: list[int], embedding: str = "") -> LayersFn:
    """Tokens of encoder layers by forward hooks (hidden_states[i] is the output of layer i-1); -1 is the model's
    last_hidden_state; `embedding`: the output field appended (the whole model runs). Otherwise, without -1, the
    layers above the highest asked for are dropped (no compute spent there)."""
    owner, attr, mods = _find_layer_list(model)
    index = {layer: hidden_index(layer, len(mods)) for layer in layers if layer != -1}
    if -1 not in layers and not embedding:
        setattr(owner, attr, nn.ModuleList(list(mods)[:max(index.values())]))
        mods = getattr(owner, attr)
    box: dict[int, torch.Tensor] = {}

    def keep(i: int) -> Callable:
        def hook(_m, _i, out):
            box[i] = out[0] if isinstance(out, (tuple, list)) else out
        return hook

    for i in set(index.values()):
        mods[i - 1].register_forward_hook(keep(i))

    def body(x: torch.Tensor) -> list[torch.Tensor]:
        box.clear()
        out = model(**inputs(x))
        got = [out.last_hidden_state if layer == -1 else box[index[layer]] for layer in layers]
        box.clear()
        return got + ([getattr(out, embedding)] if embedding else [])

    return body


def _hf_forward(model: nn.Module, cfg: BackboneCfg, layers: Sequence[int], embedding: str = "") -> LayersFn:
    inputs, layers = _hf_inputs(cfg), list(layers)
    if embedding:
        hooked = _hooked_tokens(model, inputs, layers, embedding)
        if not cfg.drops_cls:
            return hooked

        def drop(x: torch.Tensor) -> list[torch.Tensor]:
            *tokens, emb = hooked(x)
            return [t[:, 1:] for t in tokens] + [emb]

        return drop
    if layers == [-1]:
        body: LayersFn = lambda x: [model(**inputs(x)).last_hidden_state]  # noqa: E731
    elif cfg.output_shape == "bchw":
        body = _stage_maps(model, inputs, layers)
    else:
        body = _hooked_tokens(model, inputs, layers)
    if cfg.drops_cls:
        return lambda x: [t[:, 1:] for t in body(x)]
    return body


# ---- building ----------------------------------------------------------------------------------------------------
def _hf_class_config(cfg: BackboneCfg) -> tuple[type, Any]:
    """The class and config of an hf backbone: an alias's own `hf_config` (no file needed), else the config.json
    of its folder or cached snapshot."""
    if cfg.name in aliases():  # an alias carries its whole config: no file needed
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


def _build_hf(cfg: BackboneCfg, loc: Located) -> nn.Module:
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


# ---- the joint image-text space: CLIP's projection, SigLIP's pooling head --------------------------------------
def _two_tower(cfg: BackboneCfg) -> tuple[type, Any, str, dict[str, Any]]:
    """(vision class with its head, its config, the output field of its image embedding, the whole config) of a
    two-tower checkpoint: CLIP's `*WithProjection` (image_embeds), SigLIP's tower (pooler_output, its head)."""
    import transformers as T

    cls, conf = _hf_class_config(cfg)
    full = {"projection_dim": cfg.hf_config.get("projection_dim")} if cfg.name in aliases() else _read_hf_dir(_hf_folder(cfg))[1]
    proj = getattr(T, cls.__name__ + "WithProjection", None)
    if proj is not None and full.get("projection_dim"):
        return proj, proj.config_class(**{**conf.to_dict(), "projection_dim": full["projection_dim"]}), "image_embeds", full
    if cfg.model_type.startswith("siglip") and getattr(conf, "vision_use_head", True) is not False:
        return cls, conf, "pooler_output", full
    raise ConfigError("this model has no projection head into an image-text space", given=cfg.name,
                      fix="use --pool mean or cls, or a CLIP, SigLIP or open_clip model")


_EMBED_DIMS: dict[tuple[str, str, str], int | None] = {}


def _embed_dim(cfg: BackboneCfg) -> int | None:
    key = (cfg.name, cfg.source, cfg.revision)
    if key not in _EMBED_DIMS:
        try:
            _, conf, field, _ = _two_tower(cfg)
            _EMBED_DIMS[key] = int(conf.projection_dim if field == "image_embeds" else conf.hidden_size)
        except ConfigError:
            _EMBED_DIMS[key] = None
    return _EMBED_DIMS[key]


def _build_two_tower(cfg: BackboneCfg, loc: Located) -> nn.Module:
    """The vision tower with its head (weights by transformers, the head's checked present), and the model's text
    side kept beside it for `embed_text` (built on first use from the same checkpoint)."""
    cls, conf, _, _ = _two_tower(cfg)
    if loc.kind == "random":
        return cls(conf)
    if loc.kind == "file":
        model = cls(conf)
        load_into(model, read_checkpoint(Path(loc.path)), loc.path, cfg.name, keep=("visual_projection",))
        return model
    with _quiet_transformers():
        model, info = cls.from_pretrained(loc.path, config=conf, local_files_only=True, output_loading_info=True)
    missing = [k for k in info.get("missing_keys", ()) if not unused_key(k) or k.startswith("visual_projection")]
    if missing:
        raise ConfigError(f"the checkpoint in {loc.path} does not hold {len(missing)} weights of {cls.__name__} "
                          f"(first: {', '.join(sorted(missing)[:3])})", given=cfg.name,
                          fix="pass a two-tower checkpoint (CLIP, SigLIP) with its projection head")
    model.s2cli_checkpoint = loc.path  # where the text tower comes from (embed_text)
    return model.float()


def _text_embedder(module: nn.Module, cfg: BackboneCfg) -> Callable[[list[str]], torch.Tensor]:
    """The checkpoint's own text features (get_text_features) with its own tokenizer, from the same folder."""
    import transformers as T

    path = getattr(module, "s2cli_checkpoint", None)
    if path is None:
        raise ConfigError("embed_text needs the model's checkpoint folder (its text tower and tokenizer)", given=cfg.name,
                          fix="load the model from the hub or a save_pretrained folder, not --weights FILE or --random-init")
    hub.ensure_tokenizer(Path(path), cfg.name)
    with _quiet_transformers():
        model = T.AutoModel.from_pretrained(path, local_files_only=True).eval()
        tok = T.AutoTokenizer.from_pretrained(path, local_files_only=True)
    padding = "max_length" if cfg.model_type.startswith("siglip") else True  # SigLIP was trained on padded text

    def embed(texts: list[str]) -> torch.Tensor:
        batch = tok(list(texts), padding=padding, truncation=True, return_tensors="pt")
        with torch.no_grad():
            out = model.get_text_features(**batch)
        return getattr(out, "pooler_output", out)

    return embed


class HF(Family):
    name = NAME

    def describe(self, spec: str, rest: str, *, layer: int | None, keep_cls: bool) -> BackboneCfg:
        path = Path(rest).expanduser()
        if path.is_dir():
            return _hf_describe(spec, str(path.resolve()), path, layer, keep_cls)
        ref = hub.parse_ref(rest, spec)
        snap = hub.ensure(ref, what=spec, weights=False)
        return _hf_describe(spec, ref.repo, snap.path, layer, keep_cls, hub_id=ref.repo, revision=snap.sha)

    def build(self, cfg: BackboneCfg, loc: Located, any_size: bool) -> nn.Module:
        return _build_hf(cfg, loc)

    def forward(self, module: nn.Module, cfg: BackboneCfg, layers: Sequence[int]) -> LayersFn:
        return _hf_forward(module, cfg, layers)

    def embed_dim(self, cfg: BackboneCfg) -> int | None:
        return _embed_dim(cfg)

    def build_embedding(self, cfg: BackboneCfg, loc: Located, any_size: bool) -> nn.Module:
        return _build_two_tower(cfg, loc)

    def forward_embedding(self, module: nn.Module, cfg: BackboneCfg, layers: Sequence[int]) -> LayersFn:
        return _hf_forward(module, cfg, layers, _two_tower(cfg)[2])

    def text_embedder(self, module: nn.Module, cfg: BackboneCfg) -> Callable[[list[str]], torch.Tensor]:
        return _text_embedder(module, cfg)

    def hub_target(self, spec: str, rest: str) -> tuple[hub.Ref, str | None, str | None] | None:
        if Path(rest).expanduser().is_dir():
            return None
        return hub.parse_ref(rest, spec), None, "config.json"

    def local_dir(self, cfg: BackboneCfg) -> bool:
        return os.path.isabs(cfg.source) and Path(cfg.source).is_dir()

    def any_size(self, cfg: BackboneCfg) -> bool:
        """ConvNets and DINOv2 (it interpolates its position embedding); other ViTs have a fixed one."""
        return cfg.output_shape == "bchw" or cfg.model_type.startswith("dinov2")


register_family(HF())

# ---- aliases -------------------------------------------------------------------------------------------------
register_alias(BackboneCfg(
    name="clip-vit-l-336", family=NAME, source="openai/clip-vit-large-patch14-336",
    hub_id="openai/clip-vit-large-patch14-336", input_size=336, patch_size=14,
    channels=1024, num_prefix_tokens=0, layer=-2, output_shape="bnc", mean=CLIP_MEAN, std=CLIP_STD, fit="crop",
    model_type="clip", drops_cls=True,
    hf_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu"),
    description="OpenAI CLIP ViT-L/14 at 336 (LLaVA-1.5): layer -2, CLS dropped, 576 tokens per tile"))
register_alias(BackboneCfg(
    name="clip-vit-b-16", family=NAME, source="openai/clip-vit-base-patch16",
    hub_id="openai/clip-vit-base-patch16", input_size=224, patch_size=16,
    channels=768, num_prefix_tokens=0, layer=-2, output_shape="bnc", mean=CLIP_MEAN, std=CLIP_STD, fit="crop",
    model_type="clip", drops_cls=True,
    hf_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   image_size=224, patch_size=16, projection_dim=512, hidden_act="quick_gelu"),
    description="OpenAI CLIP ViT-B/16 at 224: layer -2, CLS dropped, 196 tokens per tile"))


def siglip_so400m(size: int, used_by: str) -> BackboneCfg:
    """Google's SigLIP so400m/14 tower at `size` (the same model at 384 and 448; layer -2, no CLS)."""
    tokens = (size // 14) ** 2
    return BackboneCfg(
        name=f"siglip-so400m-{size}", family=NAME, source=f"google/siglip-so400m-patch14-{size}",
        hub_id=f"google/siglip-so400m-patch14-{size}", input_size=size,
        patch_size=14, channels=1152, num_prefix_tokens=0, layer=-2, output_shape="bnc", mean=HALF, std=HALF,
        fit="squash", model_type="siglip_vision_model",
        hf_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                       image_size=size, patch_size=14, hidden_act="gelu_pytorch_tanh"),
        description=f"SigLIP so400m/14 at {size} ({used_by}): layer -2, no CLS, {tokens} tokens per tile")


register_alias(siglip_so400m(384, "VILA-1.5"))
register_alias(siglip_so400m(448, "NVILA's tower"))
register_alias(BackboneCfg(
    name="dinov2-l", family=NAME, source="facebook/dinov2-large",
    hub_id="facebook/dinov2-large", input_size=224, patch_size=14, channels=1024,
    num_prefix_tokens=1, layer=-1, output_shape="bnc", mean=IMAGENET_MEAN, std=IMAGENET_STD, fit="crop",
    model_type="dinov2",
    hf_config=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4, patch_size=14,
                   image_size=518, layerscale_value=1e-5),
    description="DINOv2 ViT-L/14 at 224: final normed features, CLS kept as a prefix token, 256 tokens per tile"))
