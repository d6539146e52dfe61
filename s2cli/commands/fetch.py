"""`s2 fetch`: one call to `s2cli.fetch`: the weights runs will need, into the HF cache, for offline nodes."""
from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from . import options as o
from ._common import err, offline, reported


def fetch(
    models: Annotated[Optional[list[str]], typer.Argument(help="Models: aliases, hf:org/name[@revision], timm:<name>, timm:hf-hub:org/name.", show_default=False)] = None,
    recipe: Annotated[Optional[list[str]], typer.Option("--recipe", help="Also the model of this recipe (repeatable).")] = None,
    offline_only: o.Offline = False,
    quiet: o.Quiet = False,
    as_json: o.Json = False,
) -> None:
    """Download what runs of these models will need (config, preprocessor and weights only) into the HF cache
    ($HF_HOME), where there is network; print each one's revision and cache path. With --offline (or
    HF_HUB_OFFLINE=1), check that the cache holds them. Runs on machines that see this cache then work offline.

    Examples:
      s2 fetch clip-vit-l-336 dinov2-l
      s2 fetch --recipe llava-1.5-s2 --recipe vila-1.5-s2
      HF_HOME=/shared/hf s2 fetch hf:facebook/dinov2-with-registers-base@main
    """
    from .. import api, hub

    with reported(quiet), offline(offline_only):
        rows = api.fetch(*(models or ()), recipes=tuple(recipe or ()))
        if as_json:
            print(json.dumps(rows))
            return
        for r in rows:
            print(f"{r['model']}\t{r['revision'] or r['weights']}\t{r['path']}")  # tab-separated: cut -f3 gives the path
        env = " ".join(f"{k}={v}" for k, v in hub.cache_env().items())
        err.print(f"{len(rows)} model{'s' * (len(rows) != 1)} ready in {hub.cache_dir()}; without network: "
                  f"{env} HF_HUB_OFFLINE=1 s2 extract ...", highlight=False)
