"""Backbones: the one entry to models: `resolve` turns an alias or a family's spec string (`timm:…`, `hf:…`,
`open_clip:…`; families/ parses them) into a BackboneCfg, `load_backbone` builds it from the weights
`weights.locate` finds (hub repos are downloaded on first use, see hub.py), and `Backbone` runs it:
`f(normalized images) -> tokens (B, N, C) or maps (B, C, H, W)`, with channels_last and compile.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from . import hub
from ._lazy import nn, torch
from .errors import ConfigError
from .families import (  # noqa: F401
    CLIP_MEAN,
    CLIP_STD,
    HALF,
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneCfg,
    aliases,
    family_names,
    split_spec,
)
from .weights import Located, locate

_REGISTRY = aliases()  # the aliases, registered by their families' modules


def list_models() -> list[BackboneCfg]:
    return list(_REGISTRY.values())


def resolve(spec: str, *, layer: int | None = None, keep_cls: bool = False) -> BackboneCfg:
    """Turn an alias or a spec string into a BackboneCfg. Loads no weights; a hub repo's spec reads its config from
    the hub cache (downloaded on first use)."""
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
    found = split_spec(spec)
    if found is not None:
        fam, rest = found
        return fam.describe(spec, rest, layer=layer, keep_cls=keep_cls)
    known = ", ".join(_REGISTRY)
    prefixes = ", ".join(f"{name}:<...>" for name in family_names())
    raise ConfigError("unknown model", given=spec, expected=f"an alias ({known}) or a family's spec ({prefixes})",
                      fix="run `s2 models` for the aliases; see docs/models.md for the spec strings")


# ---- loaded backbones ----------------------------------------------------------------------------------------
class Backbone:
    """A loaded backbone: `backbone(x)` maps normalized images (B, 3, S, S) to tokens or feature maps. Built with
    `embed=True`, each call also appends the model's own image embedding of each input, (B, D), to `embeddings`
    (from the same forward), in call order: `take_embeddings()` returns and clears them."""

    embeddings: list[torch.Tensor] | None = None  # with embed=True: the image embeddings of the calls since the last take
    _first: tuple[Callable, Callable[[torch.Tensor], torch.Tensor]] | None = None  # eager_forward, kept

    def __init__(self, cfg: BackboneCfg, module: nn.Module, weights: str, revision: str | None = None,
                 embed: bool = False, layers: Sequence[int] | None = None):
        self.cfg = cfg
        self.module = module.eval().requires_grad_(False)
        self.weights = weights  # what it was loaded from (the output's `weights` attribute)
        self.revision = revision  # what a resumed run must load again (weights.Located.revision)
        # --layers: the listed layers from one forward, side by side on the channel axis (B, N, L*C), so the engine
        # and the strategies' merges, which treat every channel alike, carry them all; the Extractor splits them
        self.layers = list(layers) if layers is not None else [cfg.layer]
        make = cfg.kind.forward_embedding if embed else cfg.kind.forward
        self._fn: Callable[[torch.Tensor], list[torch.Tensor]] = make(self.module, cfg, self.layers)
        self._eager: Callable[[torch.Tensor], list[torch.Tensor]] | None = None  # the forward before compile()
        self.nhwc = False  # channels_last() was applied
        self.embeddings = [] if embed else None

    def take_embeddings(self) -> torch.Tensor:
        """The image embeddings of every input since the last take, (inputs, D), in call order."""
        if self.embeddings is None:
            raise RuntimeError("this backbone was loaded without embed=True")
        out, self.embeddings[:] = torch.cat(self.embeddings), []
        return out

    def embed_text(self, texts: list[str]) -> torch.Tensor:
        """The model's own text embeddings of `texts`, (len(texts), D), in the space of its image embeddings."""
        return self.cfg.kind.text_embedder(self.module, self.cfg)(texts)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Backbone":
        self.module.to(device=device, dtype=dtype)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self._fn(x)
        if self.embeddings is not None:
            self.embeddings.append(out[-1])
        return self._joined(out)

    def _joined(self, out: list[torch.Tensor]) -> torch.Tensor:
        """The forward's layer outputs as one tensor: the one layer, or --layers' side by side on the last axis."""
        return out[0] if len(self.layers) == 1 else torch.cat(out[:len(self.layers)], dim=-1)

    @property
    def eager_forward(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The forward as built, before any compile()."""
        fn = self._eager or self._fn
        if self._first is None or self._first[0] is not fn:
            self._first = (fn, lambda x: self._joined(fn(x)))
        return self._first[1]

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

            def nhwc(x: torch.Tensor) -> list[torch.Tensor]:
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


def load_backbone(cfg: BackboneCfg, *, weights: str | None = None, random_init: bool = False, seed: int = 0,
                  any_size: bool = False, located: Located | None = None, embed: bool = False,
                  layers: Sequence[int] | None = None) -> Backbone:
    """Build the architecture and load its weights (or initialize it deterministically from `seed`): `located`
    if given (see `weights.locate`), else found now (a hub model is downloaded on first use).
    `any_size`: the strategy feeds inputs of any size (timm ViTs are built with dynamic_img_size=True).
    `embed`: with its projection head, recording image embeddings (`--pool embed`) and able to embed text.
    `layers`: several layers from one forward (`Backbone`), else `cfg.layer`."""
    loc = located or locate(cfg, weights, random_init, seed)
    if loc.kind == "random":
        torch.manual_seed(seed)
    module = (cfg.kind.build_embedding if embed else cfg.kind.build)(cfg, loc, any_size)
    return Backbone(cfg, module, loc.record, loc.revision, embed=embed, layers=layers)


def embed_text(model: str | Backbone, texts: list[str]) -> torch.Tensor:
    """Text queries in the joint image-text space of `model` (an alias or spec, or a Backbone loaded with
    embed=True): its own text embeddings (CLIP's get_text_features, open_clip's encode_text), (len(texts), D),
    not normalized; compare them by cosine with `--pool embed` vectors or an `s2 export` of them."""
    bb = model if isinstance(model, Backbone) else load_backbone(resolve(model), embed=True)
    return bb.embed_text(list(texts))


# ---- ahead of a run ------------------------------------------------------------------------------------------
def _hub_target(spec: str) -> tuple[hub.Ref, str | None, str | None] | None:
    """The hub repo a spec's weights come from (ref, the weights file if the model names one, the config file the
    repo must hold), or None when they do not come from the hub (a folder, the efficientnet package)."""
    found = split_spec(spec)
    target = found[0].hub_target(spec, found[1]) if found else None
    if target is not None:
        return target
    cfg = _REGISTRY.get(spec) or (resolve(spec) if found else None)
    if cfg is None or not cfg.hub_id or cfg.default_weights != "hub" or cfg.local_dir:
        return None
    return hub.Ref(cfg.hub_id, cfg.revision or None), cfg.hub_file or None, cfg.hub_config


def fetch(spec: str) -> dict[str, Any]:
    """`s2 fetch`: ask the hub for a model's repo now and download what a run needs of it (configs and weights;
    offline: check the cache), then describe it from what is cached, so that a model s2cli cannot run fails here
    and not on the cluster. Returns its weights' record, revision and cache path."""
    target = _hub_target(spec)
    if target is not None and not hub.offline():
        ref, filename, config = target
        with hub.node_lock(ref.repo):
            hub.download(ref, what=spec, weights=True, filename=filename, config=config)
    cfg = resolve(spec)
    loc = locate(cfg)
    files = [p for p in Path(loc.path).rglob("*") if p.is_file()] if loc.path and Path(loc.path).is_dir() else []
    size = sum(p.stat().st_size for p in files) if files else (Path(loc.path).stat().st_size if loc.path else 0)
    return {"model": spec, "weights": loc.record, "revision": loc.revision, "path": loc.path,
            "files": sorted(p.relative_to(loc.path).as_posix() for p in files), "bytes": size}
