"""s2cli: multi-scale (S²) vision features for image collections, from the command line or Python.

Data flow, module by module: inputs (listing, reading, decode; pixels fits) -> plan (per-image plans, no torch)
-> strategies + tiling (the S² engine and the dynamic-resolution strategies) + backbones -> extractor (the device)
-> run (the loop) -> writers -> outdir (the output folder); readers and export read it back; api puts a run
together (`extract`), cli is its face.
"""
from .api import Progress, extract, fetch, plan, settings  # noqa: E402
from .config import ExtractConfig, Resolved  # noqa: E402
from .errors import ConfigError, S2Error, WeightsNotFoundError  # noqa: E402
from .plan import views  # noqa: E402
from .probe import probe  # noqa: E402
from .readers import open_features  # noqa: E402
from .tiling import multiscale_forward, plan_multiscale  # noqa: E402  (torch itself is imported on first use)
from .version import __version__

# torch-side helpers, imported on first use (`import s2cli` and the dry run never import torch)
_LAZY = {"FeatureDataset": "dataset", "collate_features": "dataset", "to_hf_dataset": "hf", "embed_text": "backbones"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 's2cli' has no attribute {name!r}")


__all__ = ["FeatureDataset", "collate_features", "to_hf_dataset", "embed_text", "extract", "fetch", "plan", "probe", "settings", "views", "Progress", "ExtractConfig", "Resolved", "multiscale_forward",
           "plan_multiscale", "open_features", "S2Error", "ConfigError", "WeightsNotFoundError", "__version__"]
