"""`s2 inspect`: what a feature file or output folder holds, or one image."""
from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..errors import ConfigError
from . import options as o
from ._common import entries, out, reported, stops_quietly


def inspect_features(
    path: Annotated[str, typer.Argument(help="A .h5/.safetensors file or an output folder written by `s2 extract`.")],
    key: Annotated[Optional[str], typer.Option(help="Show one image's metadata and feature stats.")] = None,
    keys: Annotated[bool, typer.Option("--keys", help="List the image keys, in order, one per line.")] = False,
    limit: Annotated[Optional[int], typer.Option(help="With --keys: only the first N.")] = None,
    verify: Annotated[bool, typer.Option("--verify", help="A folder: check every shard's digest against its done "
                                         "marker (reads every shard; sizes are always checked).")] = False,
    layer: Annotated[Optional[int], typer.Option(help="An output of several layers (--layers): the layer --key "
                                                 "shows (default: all).", show_default=False)] = None,
    as_json: o.Json = False,
) -> None:
    """Summarize features: model, weights, scales, images, shape, shards, failures; or one image (--key); or the
    keys (--keys).

    Examples:
      s2 inspect images.efficientnet-lite0.h5
      s2 inspect feats/ --keys --limit 10
    """
    from ..readers import image_summary, list_keys, open_features, summary

    with reported(), stops_quietly(), open_features(path, verify=verify, layer=layer) as ff:  # SIGTERM: closed, cache removed
        if keys:
            listed = list_keys(ff, limit)
            print(json.dumps(listed)) if as_json else print("\n".join(listed))
            return
        if key is not None and key not in ff:
            raise ConfigError(f"no image with this key in {path}", given=key, fix=f"list the keys with `s2 inspect {path} --keys`")
        info = image_summary(ff, key) if key is not None else summary(ff)
    if as_json:
        print(json.dumps(info))
        return
    t = Table(show_header=False, title=str(path))
    t.add_column("field", no_wrap=True)
    t.add_column("value", overflow="fold")
    for k, v in info.items():
        if k != "failed":
            t.add_row(k, str(v))
    out.print(t)
    for f in info.get("failed", []):
        out.print(f"failed: {f['key']} [{f['stage']}] {f['error']} ({f['source']})", highlight=False)
    for b in info.get("broken_shards", []):
        out.print(f"broken shard skipped: {b['shard']} ({b['unit']}, {entries(b['num_images'])}): {b['why']}; rerun the "
                  "extract command to redo it", highlight=False)
    if info.get("writing"):
        out.print(f"a run is writing this folder now ({'; '.join(info['writing'])}): shown is what is done so far",
                  highlight=False)
