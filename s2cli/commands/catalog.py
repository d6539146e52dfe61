"""`s2 models` and `s2 recipes`: what can be extracted with, as tables or JSON."""
from __future__ import annotations

import json
from typing import Annotated

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from . import complete, options as o
from ._common import out, reported
from .layout import App


def models(as_json: o.Json = False) -> None:
    """List the model aliases with their defaults (also: timm:<name>, hf:<hub id or dir>).

    Examples:
      s2 models
      s2 extract photos/ -m timm:vit_base_patch16_224 --random-init --dry-run
    """
    from ..backbones import list_models
    from ..families import family_names

    rows = [{"name": m.name, "family": m.family, "source": m.source, "input_size": m.input_size, "patch_size": m.patch_size,
             "channels": m.channels, "layer": m.layer, "num_prefix_tokens": m.num_prefix_tokens,
             "output_shape": m.output_shape, "fit": m.fit, "description": m.description} for m in list_models()]
    if as_json:
        print(json.dumps(rows))
        return
    specs = " ".join(f"{f}:NAME" for f in family_names())
    t = Table(title=f"model aliases (also {specs}); size: input/patch", title_justify="left", box=box.SIMPLE_HEAD,
              show_edge=False)
    for c in ("name (source)", "size", "C", "layer", "prefix", "fit"):
        t.add_column(c, no_wrap=True)
    for r in rows:  # the source (a hub id) under its alias, whole: at 80 columns a column of its own would fold it
        t.add_row(f"{r['name']}\n  [dim]{escape(r['source'])}[/dim]", f"{r['input_size']}/{r['patch_size']}",
                  str(r["channels"]), str(r["layer"]), str(r["num_prefix_tokens"]), r["fit"])
    out.print(t)


recipes_app = App()  # its help is the listing callback's docstring


@recipes_app.callback(invoke_without_command=True)
def recipes(ctx: typer.Context, as_json: o.Json = False) -> None:
    """List the recipes: model, scales or strategy, and the tiles and output (tokens x channels) of a 1024x768 image.

    Examples:
      s2 recipes
      s2 recipes show llava-1.5-s2
    """
    from ..plan import recipe_rows

    if ctx.invoked_subcommand is not None:
        return
    with reported():
        rows = recipe_rows()
    if as_json:
        print(json.dumps(rows))
        return
    h, w = rows[0]["image_hw"] if rows else (0, 0)
    t = Table(title=f"recipes (s2 extract --recipe NAME), for a {w}x{h} image", title_justify="left",
              caption="plan: scales or strategy; T x C: output tokens x channels", caption_justify="left")
    for c, kw in (("name", {"no_wrap": True}), ("model", {"overflow": "fold"}), ("plan", {"overflow": "fold"}),
                  ("tiles", {}), ("T x C", {"no_wrap": True})):
        t.add_column(c, **kw)
    for r in rows:
        t.add_row(r["name"], r["model"], r["plan"], str(r["tiles"]), "{} x {}".format(*r["output_shape"]))
    out.print(t)


@recipes_app.command("show")
def show_recipe(name: Annotated[str, typer.Argument(help="A recipe name (see `s2 recipes`) or a .yaml path.",
                                                    autocompletion=complete.recipes)]) -> None:
    """Print one recipe's YAML, as shipped.

    Example:  s2 recipes show llava-1.5-s2 > my.yaml   # then: s2 extract photos/ --recipe ./my.yaml
    """
    from ..config import recipe_text

    with reported():
        print(recipe_text(name), end="")
