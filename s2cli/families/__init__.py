"""Backbone families, one module each, registered on import: `timm:` (timm.py), `hf:` (hf.py) and `open_clip:`
(open_clip.py). A new family is one module with a `Family` subclass and `register_family(...)` (see base.py)."""
from . import timm, hf, open_clip  # noqa: F401,I001  (registers them, in the order `s2 models` lists their aliases)
from .base import (CLIP_MEAN, CLIP_STD, HALF, IMAGENET_MEAN, IMAGENET_STD, BackboneCfg, Family, LayersFn, aliases, family, family_names, hidden_index, register_alias,
                   register_family, split_spec, unregister_family)

__all__ = ["CLIP_MEAN", "CLIP_STD", "HALF", "IMAGENET_MEAN", "IMAGENET_STD", "BackboneCfg", "Family", "LayersFn", "aliases", "family", "family_names", "hidden_index", "register_alias",
           "register_family", "split_spec", "unregister_family"]
