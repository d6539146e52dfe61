"""s2cli: multi-scale (S²) vision features for image collections, from the command line or Python.

Pipeline, top to bottom: cli -> config -> sources -> tiling + backbones -> writers + outdir; readers and export read the
output back (launch picks the device).
"""
__version__ = "0.1.0"

from .errors import ConfigError, S2Error, WeightsNotFoundError  # noqa: E402
from .readers import open_features  # noqa: E402
from .tiling import multiscale_forward, plan_multiscale  # noqa: E402  (torch itself is imported on first use)

__all__ = ["multiscale_forward", "plan_multiscale", "open_features", "S2Error", "ConfigError",
           "WeightsNotFoundError", "__version__"]
