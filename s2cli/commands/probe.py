"""`s2 probe`: one call to `s2cli.probe`, printed as a table per variant (or --json), and its plot with -o."""
from __future__ import annotations

import json
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from . import options as o
from ._common import err, floats, given, ints, offline, out, reported

# the extraction options `s2 probe` takes once for every variant: all of `s2 extract`'s but those of its own
# (--limit, --seed: the sample's) and those that only a full run has (which images a resumed run redoes)
OWN = ("limit", "seed", "output", "retry_failed", "num_samples", "frames_as_images")


def _probe_options() -> list[str]:
    from ..probe import option_types

    return [n for n in o.OPTIONS if n in option_types() and n not in OWN] + ["offline", "quiet"]


@o.with_options(_probe_options())
def probe(
    ctx: typer.Context,
    data: Annotated[list[str], typer.Argument(help="Labelled images (a folder of class subfolders, a list, shards), "
                                                   "or outputs of `s2 extract` to score as they are.")],
    tries: Annotated[Optional[list[str]], typer.Option("--try", help="A variant: extract options as "
                     "'name=value;name=value' (e.g. 'scales=1,2;layer=-2', 'recipe=dinov2-s2'); repeat it.")] = None,
    labels: Annotated[Optional[str], typer.Option("--labels", help="A key,label CSV (default: the first folder "
                                                  "of each key).")] = None,
    label_column: Annotated[Optional[str], typer.Option("--label-column", help="The label is this metadata field "
                            "(a list's column, a json sidecar's or member's field).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="At most N images, stratified by label (the "
                                                 "same for every variant).")] = None,
    folds: Annotated[int, typer.Option("--folds", help="Stratified cross-validation folds.")] = 5,
    k: Annotated[int, typer.Option("--k", help="Neighbours of the k-NN classifier.")] = 5,
    seed: Annotated[int, typer.Option("--seed", help="The sample, the folds (and --random-init's weights).")] = 0,
    vector: Annotated[str, typer.Option("--vector", help="Per image: mean of the stored tokens, or the stored "
                                        "pooled vector (auto: mean, pooled when only it is stored).",
                                        metavar="auto|mean|pooled")] = "auto",
    workdir: Annotated[Optional[str], typer.Option("--workdir", help="Keep the variants' features here (default: "
                                                   "a temporary folder, removed).")] = None,
    plot: Annotated[Optional[str], typer.Option("--plot", "-o", help="Write accuracy against cost as a PNG "
                                                "(needs matplotlib).")] = None,
    as_json: o.Json = False,
    **kw: Any,
) -> None:
    """Which scales, layer or strategy pay off on labelled data: each --try variant extracted on the same
    stratified sample, then a linear probe and k-NN scored by cross-validation, with each variant's cost.

    Examples:
      s2 probe photos/ --try scales=1 --try scales=1,2 --try 'scales=1,2,3;layer=-2' --limit 500
      s2 probe feats_a/ feats_b/ --labels labels.csv
    """
    from ..probe import plot as draw, probe as run_probe, require_plotting

    options = {n: v for n, v in given(ctx).items() if n in kw and n not in ("offline", "quiet")}
    with reported(kw["quiet"]), offline(kw["offline"]):
        if plot is not None:
            require_plotting()
        options.update({n: p(n.replace("_", "-"), options[n]) for n, p in (("scales", floats), ("img_sizes", ints))
                        if n in options})
        progress = None
        if not kw["quiet"]:
            from .extract import BarProgress

            progress = BarProgress()
        report = run_probe(data, tries or (), labels=labels, label_column=label_column, limit=limit, folds=folds,
                           k=k, seed=seed, vector=vector, workdir=workdir, progress=progress,
                           log=None if kw["quiet"] else (lambda m: err.print(m, highlight=False)), **options)
        if plot is not None:
            draw(report, plot)
    if as_json:
        print(json.dumps(report.to_dict()))
    else:
        print_report(report)


def _cost(v: float | None, fmt: str) -> str:
    return "-" if v is None else fmt.format(v)


def print_report(report: Any) -> None:
    classes = ", ".join(f"{c} {n}" for c, n in report.classes.items())
    t = Table(title=f"s2 probe: {len(report.keys)} images ({classes}), {report.folds}-fold CV, seed {report.seed}")
    for c in ("variant", "probe acc", f"{report.k}-NN acc", "dim", "KiB/img", "tiles/img", "GFLOP/img", "img/s"):
        t.add_column(c, overflow="fold")
    for v in report.variants:
        d = v.to_dict()
        t.add_row(v.name, f"{d['probe_accuracy_mean']:.3f}±{d['probe_accuracy_std']:.3f}",
                  f"{d['knn_accuracy_mean']:.3f}±{d['knn_accuracy_std']:.3f}", str(v.dim),
                  f"{v.bytes_per_image / 1024:,.1f}", _cost(v.tiles_per_image, "{:g}"),
                  _cost(None if v.flops_per_image is None else v.flops_per_image / 1e9, "{:.2f}"),
                  _cost(v.images_per_s, "{:g}"))
    out.print(t)
    if report.dropped:
        out.print(f"left out (failed in some variant): {', '.join(report.dropped)}", highlight=False)
