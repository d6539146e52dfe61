"""The backbone-family registry (timm's `register_model` idea): `BackboneCfg`, the record every consumer reads,
the `Family` interface a kind of backbone implements (its spec prefix, how it is described from its config, built,
run to chosen layers, and which hub files its weights need), and the one place a spec's prefix is parsed.
Nothing here imports torch or a model library."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from .. import hub
    from ..weights import Located

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class BackboneCfg:
    """What the data path and the engine ask of a backbone (timm's PretrainedCfg idea)."""

    name: str  # alias or spec string
    family: str  # the registered Family that describes, builds and runs it ("hf", "timm", "open_clip", ...)
    source: str  # hub id, local dir, or the family's architecture name
    input_size: int  # tile side the backbone was trained on
    patch_size: int  # pixels per output token (ViT patch; ConvNet total stride)
    channels: int  # C of the features
    num_prefix_tokens: int  # prefix tokens kept in the output (CLS, registers)
    layer: int  # hidden layer; -1 = the model's final features
    output_shape: str  # "bnc" or "bchw"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    fit: str = "crop"  # default preprocessing (crop|squash|pad|keep)
    # how a center crop's first row/column is rounded where the margin is odd: "floor" ((size - crop) // 2, as
    # transformers' processors) or "half-even" (round((size - crop) / 2), torchvision's CenterCrop: open_clip's)
    crop_round: str = "floor"
    description: str = ""
    model_type: str = ""  # the family's own name of the architecture (HF model_type, open_clip model name)
    hf_config: dict[str, Any] = field(default_factory=dict)  # transformer dims (FLOPs); an alias's whole HF config
    drops_cls: bool = False  # the model emits a CLS token that the output drops
    gflops_per_tile: float | None = None  # at input_size, for the dry-run estimate when no formula applies
    default_weights: str = "hub"  # "hub" (HF cache) or "efficientnet-lite0-package"
    hub_id: str = ""  # the hub repo of its weights ("": none, or a local folder)
    hub_file: str = ""  # the weights file in that repo, when the model names one (timm's hf_hub_filename)
    revision: str = ""  # the hub commit its config was read from ("": the repo's main, pinned when weights load)

    @property
    def kind(self) -> "Family":
        """Its family, as registered."""
        return family(self.family)

    @property
    def local_dir(self) -> bool:
        """A model described from a folder on this machine (its source is that folder's absolute path)."""
        return self.kind.local_dir(self)

    @property
    def hub_config(self) -> str | None:
        """The config file a hub snapshot of its weights must hold (None: the weights alone)."""
        return self.kind.hub_config(self)

    @property
    def embed_dim(self) -> int | None:
        """The width of its image embedding in the joint image-text space (its projection head), None: no head."""
        return self.kind.embed_dim(self)

    @property
    def any_size(self) -> bool:
        """It runs on inputs of any size (the native strategy needs this)."""
        return self.kind.any_size(self)

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


# what a forward to chosen layers returns: one tensor per layer asked for, in that order
LayersFn = Callable[["torch.Tensor"], "list[torch.Tensor]"]


class Family:
    """One kind of backbone. A subclass sets `name` (its spec prefix: `name:rest`, and `BackboneCfg.family`),
    implements `describe`, `build` and `forward`, and is registered with `register_family(Subclass())`;
    everything else asks it through a BackboneCfg (`cfg.kind`), never by comparing names."""

    name: str = ""

    def describe(self, spec: str, rest: str, *, layer: int | None, keep_cls: bool) -> BackboneCfg:
        """The BackboneCfg of the spec `name:rest` from its config alone (no weights load; a hub repo's configs
        are downloaded on first use). `layer`: None for the family's default."""
        raise NotImplementedError

    def build(self, cfg: BackboneCfg, loc: "Located", any_size: bool) -> "nn.Module":
        """The module with the weights `loc` names (`weights.locate`); `any_size`: inputs of any size will come."""
        raise NotImplementedError

    def forward(self, module: "nn.Module", cfg: BackboneCfg, layers: Sequence[int]) -> LayersFn:
        """`f(normalized images (B, 3, H, W)) -> [tokens (B, N, C) or maps (B, C, h, w)]`, one per layer in
        `layers` (hidden-layer indices as `--layer` takes them; -1 the model's final features), from one forward;
        the model may be pruned above the highest layer asked for."""
        raise NotImplementedError

    def embed_dim(self, cfg: BackboneCfg) -> int | None:
        """The width of the model's image embedding in its joint image-text space; None: it has no projection head."""
        return None

    def build_embedding(self, cfg: BackboneCfg, loc: "Located", any_size: bool) -> "nn.Module":
        """As `build`, with the projection head and the text tower's weights kept (`--pool embed`, `embed_text`)."""
        raise ConfigError("this model has no projection head into an image-text space", given=cfg.name,
                          fix="use --pool mean or cls, or a CLIP, SigLIP or open_clip model")

    def forward_embedding(self, module: "nn.Module", cfg: BackboneCfg, layers: Sequence[int]) -> LayersFn:
        """As `forward` on a `build_embedding` module, from the same one forward: the layers' outputs, then the
        model's own image embedding of each input (B, D) (CLIP's get_image_features, open_clip's encode_image)."""
        raise ConfigError("this model has no projection head into an image-text space", given=cfg.name,
                          fix="use --pool mean or cls, or a CLIP, SigLIP or open_clip model")

    def text_embedder(self, module: "nn.Module", cfg: BackboneCfg) -> "Callable[[list[str]], torch.Tensor]":
        """`f(texts) -> (len(texts), D)`: the model's own text embeddings, in the space of its image embeddings."""
        raise ConfigError("this model has no text tower", given=cfg.name, fix="use a CLIP, SigLIP or open_clip model")

    def hub_target(self, spec: str, rest: str) -> "tuple[hub.Ref, str | None, str | None] | None":
        """For `s2 fetch` of `name:rest`, before it is described: (repo, weights file or None, config file or
        None) when its weights come from a hub repo named in the spec; None: describe it, then use its hub_id."""
        return None

    def hub_config(self, cfg: BackboneCfg) -> str | None:
        """The config file a hub snapshot of `cfg`'s weights must hold."""
        return "config.json"

    def local_dir(self, cfg: BackboneCfg) -> bool:
        return False

    def any_size(self, cfg: BackboneCfg) -> bool:
        """Whether it runs on inputs of any size: ConvNet maps do."""
        return cfg.output_shape == "bchw"


_FAMILIES: dict[str, Family] = {}
_ALIASES: dict[str, BackboneCfg] = {}


def register_family(fam: Family) -> Family:
    """Register a family under its `name` (its spec prefix); a name taken twice is refused."""
    if not fam.name or ":" in fam.name or fam.name in _FAMILIES:
        raise ValueError(f"backbone family name empty, with ':' or registered twice: {fam.name!r}")
    _FAMILIES[fam.name] = fam
    return fam


def unregister_family(name: str) -> None:
    """Remove a family (a test's toy family)."""
    _FAMILIES.pop(name, None)


def family(name: str) -> Family:
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ConfigError("no such backbone family", given=name, expected=" | ".join(_FAMILIES),
                          fix="register the family first (s2cli.families.register_family)") from None


def family_names() -> list[str]:
    return list(_FAMILIES)


def register_alias(cfg: BackboneCfg) -> BackboneCfg:
    """A short model name with its settings (`clip-vit-l-336`); its family must know `cfg.family`."""
    if cfg.name in _ALIASES:
        raise ValueError(f"backbone alias registered twice: {cfg.name}")
    _ALIASES[cfg.name] = cfg
    return cfg


def aliases() -> dict[str, BackboneCfg]:
    """The alias registry itself (name -> BackboneCfg)."""
    return _ALIASES


def split_spec(spec: str) -> tuple[Family, str] | None:
    """The one place a spec's prefix is read: `family:rest` -> (that family, rest), else None."""
    prefix, sep, rest = spec.partition(":")
    if sep and rest and prefix in _FAMILIES:
        return _FAMILIES[prefix], rest
    return None


def hidden_index(layer: int, num_layers: int) -> int:
    """`--layer` as hidden_states' index: -1 the last layer's output (num_layers), 1 the first layer's."""
    idx = num_layers + 1 + layer if layer < 0 else layer
    if not 0 < idx <= num_layers:
        raise ConfigError("layer is out of range", given=layer, expected=f"-{num_layers}..-1 or 1..{num_layers}",
                          fix="pass --layer -2 (LLaVA's choice) or -1 (final features)")
    return idx
