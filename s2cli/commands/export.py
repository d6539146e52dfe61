"""`s2 export`: one call to `s2cli.export.export_embeddings`."""
from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from ..errors import ConfigError
from ..export import EXPORT_DTYPES, POOLS
from . import options as o
from ._common import err, reported, stops_quietly


def export(
    path: Annotated[str, typer.Argument(help="A feature file or output folder written by `s2 extract`.")],
    out: Annotated[Optional[str], typer.Argument(help="New folder for img_emb/*.npy and metadata/*.parquet (or -o).",
                                                 show_default=False)] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="The new folder (as OUT).",
                                                  show_default=False)] = None,
    pool: Annotated[str, typer.Option(help="auto: the stored pooled vectors, else the tokens' mean.",
                                      metavar="|".join(POOLS), autocompletion=lambda incomplete: list(POOLS))] = "auto",
    normalize: Annotated[bool, typer.Option("--normalize/--no-normalize", help="L2-normalise each vector (inner product = cosine).")] = True,
    dtype: Annotated[str, typer.Option(help="float16: as clip-retrieval writes.", metavar="|".join(EXPORT_DTYPES),
                                       autocompletion=lambda incomplete: list(EXPORT_DTYPES))] = "float16",
    layer: Annotated[Optional[int], typer.Option(help="An output of several layers (--layers): the layer to export "
                                                 "(default: each layer's vector, side by side).", show_default=False)] = None,
    as_json: o.Json = False,
) -> None:
    """Export one vector per image for retrieval (the img_emb/ + metadata/ layout clip-retrieval writes and
    autofaiss reads; metadata parquet with image_path, key and the images' metadata fields).

    Example:  s2 export feats/ -o emb/
    """
    from ..export import export_embeddings
    from ..readers import open_features

    with reported():
        if (out is None and output is None) or (out and output and out != output):
            raise ConfigError("s2 export writes one folder: give it as OUT or as -o, once",
                              given=" and ".join(filter(None, (out, output))) or "none",
                              fix="e.g. s2 export feats/ -o emb/")
        with stops_quietly(), open_features(path, layer=layer) as ff:  # SIGTERM: the temporary export and downloads removed
            summary = export_embeddings(ff, out or output, pool, normalize=normalize, dtype=dtype)
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


