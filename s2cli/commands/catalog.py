"""`s2 models` and `s2 recipes`: what can be extracted with, as tables or JSON."""
from __future__ import annotations

import json

from rich.table import Table

from . import options as o
from ._common import out


def models(as_json: o.Json = False) -> None:
    """List model aliases with their defaults."""
    from ..backbones import list_models

    rows = [{"name": m.name, "source": m.source, "input_size": m.input_size, "patch_size": m.patch_size,
             "channels": m.channels, "layer": m.layer, "num_prefix_tokens": m.num_prefix_tokens,
             "output_shape": m.output_shape, "fit": m.fit, "description": m.description} for m in list_models()]
    if as_json:
        print(json.dumps(rows))
        return
    t = Table(title="model aliases (also: timm:<name>, hf:<hub id or dir>)")
    for c in ("name", "source", "input", "patch", "C", "layer", "prefix", "shape", "fit"):
        t.add_column(c, no_wrap=c in ("name", "source"))
    for r in rows:
        t.add_row(r["name"], r["source"], str(r["input_size"]), str(r["patch_size"]), str(r["channels"]),
                  str(r["layer"]), str(r["num_prefix_tokens"]), r["output_shape"], r["fit"])
    out.print(t)


def recipes(as_json: o.Json = False) -> None:
    """List the shipped recipes (use one with `s2 extract --recipe NAME`; flags override its values)."""
    from ..config import list_recipes, load_recipe

    rows = []
    for name, path in sorted(list_recipes().items()):
        values, doc = load_recipe(name)
        rows.append({"name": name, "description": doc.get("description", ""), "output_shape": doc.get("output_shape"),
                     "config": values, "path": str(path)})
    if as_json:
        print(json.dumps(rows))
        return
    t = Table(title="recipes (s2 extract --recipe NAME)")
    for c in ("name", "output (T, C)", "settings", "description"):
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(r["name"], str(r["output_shape"]), ", ".join(f"{k}={v}" for k, v in r["config"].items()), r["description"])
    out.print(t)


