"""`s2 export`: one call to `s2cli.export.export_embeddings`."""
from __future__ import annotations

import json
from typing import Annotated

import typer

from . import options as o
from ._common import err, reported


def export(
    path: Annotated[str, typer.Argument(help="A feature file or output folder written by `s2 extract`.")],
    out: Annotated[str, typer.Argument(help="New folder for img_emb/*.npy and metadata/*.parquet.")],
    pool: Annotated[str, typer.Option(help="auto (stored pooled vectors, else token mean) | pooled | mean.")] = "auto",
    normalize: Annotated[bool, typer.Option("--normalize/--no-normalize", help="L2-normalise each vector (inner product = cosine).")] = True,
    dtype: Annotated[str, typer.Option(help="float16 (as clip-retrieval writes) | float32.")] = "float16",
    as_json: o.Json = False,
) -> None:
    """Export one vector per image for retrieval (the img_emb/ + metadata/ layout clip-retrieval writes and
    autofaiss reads; metadata parquet with image_path, key and the images' metadata fields).

    Example:  s2 export feats/ emb/
    """
    from ..export import export_embeddings
    from ..readers import open_features

    with reported():
        with open_features(path) as ff:
            summary = export_embeddings(ff, out, pool, normalize=normalize, dtype=dtype)
    if as_json:
        print(json.dumps(summary))
    else:
        err.print(f"{summary['num_images']} vectors of {summary['dim']} ({summary['pool']}, {summary['dtype']}"
                  f"{', L2-normalised' if summary['normalized'] else ''}) -> {summary['output']}", highlight=False)
        for b in summary["broken_shards"]:
            err.print(f"broken shard skipped: {b['shard']} ({b['why']}); rerun the extract command to redo it",
                      highlight=False)
        if not summary["complete"]:
            err.print(f"{path} is not complete: exported what is done", highlight=False)


