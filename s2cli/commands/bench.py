"""`s2 bench`: one call to `s2cli.bench.bench`, printed as a table."""
from __future__ import annotations

import json
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from ..errors import ConfigError
from . import options as o
from ._common import out, reported

# `s2 bench` takes these options of `s2 extract` (declared once, in options.py)
BENCH_OPTIONS = ("recipe", "model", "weights", "offline", "random_init", "seed", "layer", "keep_cls", "scales", "img_sizes",
                 "max_split_size", "split_mode", "resize_output_to_idx", "fit", "antialias", "batch_size", "workers",
                 "prefetch_factor", "max_tiles_per_call", "device", "precision", "dtype", "pool", "pool_only", "compile", "channels_last",
                 "decode", "input_format", "image_key", "strategy", "min_tiles", "max_tiles", "thumbnail",
                 "grid_pinpoints", "anyres_max", "min_pixels", "max_pixels")


@o.with_options(BENCH_OPTIONS)
def bench(
    ctx: typer.Context,
    input: Annotated[Optional[str], typer.Argument(help="A folder or list of images (default: synthetic JPEGs made in memory).")] = None,
    images: Annotated[int, typer.Option("--images", "-n", help="Images to time (synthetic, or the first N of INPUT).")] = 64,
    image_size: Annotated[str, typer.Option("--image-size", help="Synthetic JPEG size WxH.")] = "1024x768",
    as_json: o.Json = False,
    **kw: Any,
) -> None:
    """Time `s2 extract` end to end (after a warm-up batch) against the bare engine on the same decoded images:
    img/s, FLOPs per image (torch's flop counter), MFU against a matmul measured here, stage seconds, peak memory.

    Examples:
      s2 bench -m timm:vit_tiny_patch16_224 --random-init --images 64
      s2 bench photos/ --recipe llava-1.5-s2 --random-init --device cuda --precision bf16 --compile --json
    """
    from ..bench import bench as run_bench
    from ._common import floats, given, ints, offline

    kw = {k: v for k, v in given(ctx).items() if k in BENCH_OPTIONS}

    with reported(), offline(kw.pop("offline", False)):
        try:
            w, h = (int(v) for v in image_size.lower().split("x"))
        except ValueError:
            raise ConfigError("--image-size must be WxH", given=image_size, fix="e.g. --image-size 1024x768") from None
        kw["scales"], kw["img_sizes"] = floats("scales", kw.get("scales")), ints("img-sizes", kw.get("img_sizes"))
        report = run_bench(input, images, (h, w), **kw)
    if as_json:
        print(json.dumps(report))
    else:
        _print_bench(report)


def _print_bench(r: dict) -> None:
    t = Table(title=f"s2 bench: {r['model']} on {r['device']} ({r['precision']}{', compiled' if r['compile'] else ''}), "
                    f"{r['images']} images of {r['input']}, batch {r['batch_size']}, -j {r['workers']}, "
                    f"{r['torch_threads']} torch threads")
    t.add_column("figure")
    t.add_column("value", justify="right")
    gi = 2 ** 30
    formula = r["flops_per_image_formula"]
    rows = [("end to end (s2 extract)", f"{r['e2e_img_s']:.2f} img/s ({r['e2e_seconds']:.3f} s)"),
            ("model only (bare multiscale_forward)", f"{r['model_only_img_s']:.2f} img/s ({r['model_only_seconds']:.3f} s)"),
            ("end to end / model only (time)", f"{r['e2e_over_model_only']:.3f}x"),
            ("FLOPs per image (flop counter)", f"{r['flops_per_image'] / 1e9:.3f} GFLOP"),
            ("FLOPs per image (formula)", "n/a" if formula is None else f"{formula / 1e9:.3f} GFLOP"),
            (f"matmul ceiling ({r['matmul']})", f"{r['matmul_ceiling_flops_per_s'] / 1e12:.3f} TFLOP/s"),
            ("MFU end to end / model only", f"{r['mfu_e2e']:.1%} / {r['mfu_model_only']:.1%}")]
    rows += [(f"stage {k} (busy s)", f"{v:.3f}") for k, v in r["stage_seconds"].items()]
    rows += [(f"main thread waiting on {k} (s)", f"{v:.3f}") for k, v in r["wait_seconds"].items()]
    rows += [("peak host memory (this process / decode workers)",
              f"{r['peak_host_bytes'] / gi:.2f} / {r['peak_host_children_bytes'] / gi:.2f} GiB")]
    if r["peak_gpu_bytes"] is not None:
        rows.append(("peak GPU memory", f"{r['peak_gpu_bytes'] / gi:.2f} GiB"))
    if r["reference_img_s"] is not None:
        rows.append(("reference per-scale loop (model only)", f"{r['reference_img_s']:.2f} img/s "
                     f"(ours {r['model_only_vs_reference']:.2f}x its speed)"))
    for name, m in (r["memory"] or {}).items():
        rows.append((f"peak memory, {name.replace('_', ' ')} (batch {r['memory_batch']}, {r['memory_tool']})",
                     f"{m['peak'] / 2 ** 20:.1f} MiB ({m['vs_single_scale']:.2f}x single scale)"))
    for row in rows:
        t.add_row(*row)
    out.print(t)


