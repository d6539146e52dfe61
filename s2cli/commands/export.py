"""`s2 export`: one call to `s2cli.export.export_embeddings`."""
from __future__ import annotations

import json
from typing import Annotated

import typer

from ..errors import ConfigError
from . import options as o
from ._common import err, reported


def export(
    path: Annotated[str, typer.Argument(help="A feature file or output folder written by `s2 extract`.")],
    out: Annotated[str, typer.Argument(help="New folder for img_emb/*.npy and metadata/*.parquet.")],
    pool: Annotated[str, typer.Option(help="auto (stored pooled vectors, else token mean) | pooled | mean.")] = "auto",
    as_json: o.Json = False,
) -> None:
    """Export one vector per image for retrieval (the img_emb/ + metadata/ layout autofaiss reads)."""
    from ..export import export_embeddings
    from ..readers import open_features

    with reported():
        if pool not in ("auto", "pooled", "mean"):
            raise ConfigError("--pool is not known", given=pool, expected="auto | pooled | mean", fix="pass --pool auto")
        with open_features(path) as ff:
            summary = export_embeddings(ff, out, pool)
    if as_json:
        print(json.dumps(summary))
    else:
        err.print(f"{summary['num_images']} vectors of {summary['dim']} ({summary['pool']}) -> {summary['output']}",
                  highlight=False)


