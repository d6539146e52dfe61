"""The `s2` command: the app that assembles the commands of `s2cli.commands` (one module each). Progress and logs
go to stderr, results and --json to stdout; an S2Error becomes one line on stderr and its exit code (2 usage or
configuration, 1 runtime)."""
from __future__ import annotations

from typing import Annotated

import typer

from .commands import bench, catalog, export, extract, fetch, inspect, probe, slurm, status, viz
from .commands.layout import App
from .version import __version__

app = App(no_args_is_help=True, help="Multi-scale (S²) vision features for image collections.")
app.command("extract")(extract.extract)
app.command("inspect")(inspect.inspect_features)
app.command("export")(export.export)
app.command("models")(catalog.models)
app.command("fetch")(fetch.fetch)
app.add_typer(catalog.recipes_app, name="recipes")
app.command("bench")(bench.bench)
app.command("slurm")(slurm.slurm)
app.command("status")(status.status)
app.command("probe")(probe.probe)
viz_app = App(no_args_is_help=True, help="Pictures of a plan or of stored features (PNG).")
viz_app.command("plan")(viz.viz_plan)
viz_app.command("features")(viz.viz_features)
app.add_typer(viz_app, name="viz")


# help laid out by commands.layout: it fits 80 columns with nothing cut, and uses up to 120 where there are more
@app.callback(invoke_without_command=True, context_settings={"max_content_width": 120})
def _root(version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False) -> None:
    if version:
        print(__version__)
        raise typer.Exit(0)


def main() -> None:
    app(prog_name="s2")
