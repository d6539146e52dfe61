"""`s2 viz plan` and `s2 viz features`: pictures (PNG) of a plan or of stored features."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..errors import ConfigError
from . import options as o
from ._common import err, given, reported, settings


@o.with_options(("recipe", "model", "scales", "img_sizes", "max_split_size", "fit", "strategy", "max_tiles",
                  "grid_pinpoints", "fps", "num_frames", "max_frames"))
def viz_plan(
    ctx: typer.Context,
    image: Annotated[str, typer.Argument(help="An image file, or a video file (with --num-frames or --fps).")],
    output: Annotated[str, typer.Option("--output", "-o", help="The PNG to write.")] = "plan.png",
    as_json: o.Json = False,
    **kw: Any,
) -> None:
    """Draw every scale's (or view's) tiles over IMAGE as the backbone sees it; for a video, each sampled frame with
    its index and timestamp. No weights are loaded.

    Example:  s2 viz plan examples/images/chelsea.jpg --recipe llava-next-anyres -o plan.png
              s2 viz plan clip.mp4 --recipe llava-1.5-s2 --num-frames 8 -o frames.png
    """
    from ..viz import plan_figure

    with reported():
        if not Path(image).is_file():
            raise ConfigError("no such image", given=image, fix="pass an image file")
        res = settings({**given(ctx), "input": image, "output": "viz.h5"})
        fig, panels = plan_figure(image, res)
        fig.save(output)
    _said(fig, panels, output, as_json)


def viz_features(
    path: Annotated[str, typer.Argument(help="A feature file or output folder written by `s2 extract`.")],
    key: Annotated[str, typer.Option(help="The image's key.")],
    output: Annotated[str, typer.Option("--output", "-o", help="The PNG to write.")] = "pca.png",
    layer: Annotated[Optional[int], typer.Option(help="An output of several layers (--layers): the layer to show.",
                                                 show_default=False)] = None,
    as_json: o.Json = False,
) -> None:
    """The image beside a PCA (3 components as RGB) of each scale's or view's feature map and of the merged map.

    Example:  s2 viz features images.efficientnet-lite0.h5 --key chelsea -o pca.png
    """
    from ..readers import open_features
    from ..viz import features_figure

    with reported(), open_features(path, layer=layer) as ff:
        if getattr(ff, "index", 0) is None:  # every layer of a --layers output: one map per picture
            raise ConfigError("this output holds several layers; the picture shows one", given=path,
                              expected=f"--layer {' | '.join(map(str, ff.layers))}", fix=f"add --layer {ff.layers[0]}")
        if key not in ff:
            raise ConfigError(f"no image with this key in {path}", given=key, fix=f"list the keys with `s2 inspect {path} --keys`")
        fig, panels = features_figure(ff, key)
        fig.save(output)
    _said(fig, panels, output, as_json)


def _said(fig: Any, panels: list, output: str, as_json: bool) -> None:
    """The panels drawn (JSON) or one line on stderr."""
    from ..viz import plan_summary

    if as_json:
        print(plan_summary(panels))
    else:
        err.print(f"{len(panels)} panels, {fig.width}x{fig.height} -> {output}", highlight=False)
