"""CLI: thin Typer commands over the library. Progress and logs go to stderr, results and --json to stdout;
an S2Error becomes one line on stderr and its exit code (2 usage/config, 1 runtime)."""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from inspect import Signature, signature
from typing import Annotated, Iterator, Optional, get_type_hints

import typer
from typer.models import ArgumentInfo, ParameterInfo
from rich.console import Console
from rich.table import Table

from .version import __version__
from .errors import ConfigError, S2Error

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Multi-scale (S²) vision features for image collections.")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


@contextlib.contextmanager
def _reported() -> Iterator[None]:
    try:
        yield
    except S2Error as e:
        err.print(f"[red]error:[/red] {e.one_line()}", markup=True, highlight=False)
        raise typer.Exit(e.exit_code) from None


def _floats(name: str, text: Optional[str]) -> Optional[tuple[float, ...]]:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--{name} must be comma-separated numbers", given=text, fix=f"e.g. --{name} 1,2,3") from None


def _ints(name: str, text: Optional[str]) -> Optional[tuple[int, ...]]:
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--{name} must be comma-separated integers", given=text, fix=f"e.g. --{name} 336,672,1008") from None


JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
OfflineOpt = Annotated[bool, typer.Option("--offline", help="Never reach the hub: weights come from the HF cache only (as HF_HUB_OFFLINE=1).")]


@contextlib.contextmanager
def _offline(on: bool | None) -> Iterator[None]:
    """--offline: HF_HUB_OFFLINE=1 while the command runs (processes it starts inherit it)."""
    import os

    if not on:
        yield
        return
    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before


@app.command()
def extract(
    ctx: typer.Context,
    input: Annotated[str, typer.Argument(help="A folder (recursive), a .txt/.csv/.parquet list, or WebDataset shards ('s/{000..009}.tar', a glob, a folder of .tar, pipe:CMD).")],
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="A .h5/.safetensors file, or OUTDIR/ for resumable shards (default: <input>.<model>.h5 here).")] = None,
    recipe: Annotated[Optional[str], typer.Option(help="A recipe name (see `s2 recipes`) or .yaml path; flags override it.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Alias (see `s2 models`), timm:<name> or hf:<hub id[@revision] or dir>; hub weights download on first use. [default: efficientnet-lite0]")] = None,
    weights: Annotated[Optional[str], typer.Option(help="Local checkpoint (.safetensors/.pth: plain, state_dict/model-nested, DDP, EMA) or save_pretrained dir.")] = None,
    offline: OfflineOpt = False,
    random_init: Annotated[Optional[bool], typer.Option("--random-init/--no-random-init", help="No weights: initialize from --seed (dry runs, tests).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for --random-init. [default: 0]")] = None,
    layer: Annotated[Optional[int], typer.Option(help="Hidden layer (-1 final features; default: the model's).")] = None,
    keep_cls: Annotated[Optional[bool], typer.Option("--keep-cls/--drop-cls", help="Keep CLIP's CLS token as a prefix token.")] = None,
    scales: Annotated[Optional[str], typer.Option(help="Scales times the model's input size, e.g. 1,2,3. [default: 1,2]")] = None,
    img_sizes: Annotated[Optional[str], typer.Option("--img-sizes", help="Absolute sizes per scale, e.g. 336,672,1008.")] = None,
    max_split_size: Annotated[Optional[int], typer.Option("--max-split-size", help="Tile size (default: the model's input size).")] = None,
    split_mode: Annotated[Optional[str], typer.Option("--split-mode", help="resize | pad (non-square images). [default: resize]")] = None,
    resize_output_to_idx: Annotated[Optional[int], typer.Option("--resize-output-to-idx", help="Scale whose grid the output takes. [default: 0]")] = None,
    fit: Annotated[Optional[str], typer.Option(help="crop | squash | pad | keep (default: the model's processor).")] = None,
    antialias: Annotated[Optional[bool], typer.Option("--antialias/--no-antialias", help="Antialias bicubic downscaling between scales.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Images per batch. [default: 8]")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", "-j", help="Decode workers (0: in the main process). [default: 2]")] = None,
    max_tiles_per_call: Annotated[Optional[int], typer.Option("--max-tiles-per-call", help="Cap on tiles per backbone call.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda | cuda:K. [default: auto]")] = None,
    devices: Annotated[Optional[str], typer.Option("--devices", help="One worker process per device on this machine: all | 0,1,2,3 | cpu,cpu (needs -o OUTDIR/).")] = None,
    precision: Annotated[Optional[str], typer.Option(help="Compute precision: fp32 | bf16 | fp16. [default: fp32]")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="Stored dtype: float32 | float16. [default: float32]")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N images.")] = None,
    input_format: Annotated[Optional[str], typer.Option("--input-format", help="auto | folder | list | wds. [default: auto]")] = None,
    image_key: Annotated[Optional[str], typer.Option("--image-key", help="WebDataset image member extensions, in order. [default: jpg;jpeg;png;webp]")] = None,
    format: Annotated[Optional[str], typer.Option("--format", help="Shard format in OUTDIR/: h5 | safetensors. [default: h5]")] = None,
    shard_size: Annotated[Optional[int], typer.Option("--shard-size", help="Images per output shard (default: ~1 GB files).")] = None,
    pool: Annotated[Optional[str], typer.Option(help="Also store a pooled vector per image: none | mean | cls. [default: none]")] = None,
    pool_only: Annotated[Optional[bool], typer.Option("--pool-only/--with-tokens", help="Store only the pooled vectors.")] = None,
    on_error: Annotated[Optional[str], typer.Option("--on-error", help="skip (record and go on) | stop. [default: skip]")] = None,
    max_failures: Annotated[Optional[int], typer.Option("--max-failures", help="Exit non-zero once more samples than this have failed.")] = None,
    decode_timeout: Annotated[Optional[float], typer.Option("--decode-timeout", help="Seconds before a stalled decode is recorded as failed. [default: 120]")] = None,
    check_finite: Annotated[Optional[bool], typer.Option("--check-finite/--no-check-finite", help="Record images whose features hold NaN/Inf instead of storing them. [default: check]")] = None,
    compile: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile the backbone (dynamic=False; the first batch of each tile size compiles). [default: off]")] = None,
    channels_last: Annotated[Optional[bool], typer.Option("--channels-last/--no-channels-last", help="channels_last (NHWC) weights and inputs. [default: on for ConvNets (bchw), off for ViTs]")] = None,
    decode: Annotated[Optional[str], typer.Option("--decode", help="pil (Pillow in the workers) | torch (JPEGs decoded and fitted on the device: nvJPEG on CUDA; not bit-identical to Pillow; S² only). [default: pil]")] = None,
    strategy: Annotated[Optional[str], typer.Option(help="s2 | dynamic-s2 | anyres | internvl | native | dual. [default: s2]")] = None,
    min_tiles: Annotated[Optional[int], typer.Option("--min-tiles", help="internvl: fewest tiles. [default: 1]")] = None,
    max_tiles: Annotated[Optional[int], typer.Option("--max-tiles", help="internvl, dynamic-s2: most tiles (of the last scale). [default: 12]")] = None,
    thumbnail: Annotated[Optional[bool], typer.Option("--thumbnail/--no-thumbnail", help="internvl: append a squashed thumbnail when there is more than one tile. [default: on]")] = None,
    grid_pinpoints: Annotated[Optional[str], typer.Option("--grid-pinpoints", help="anyres: candidate canvases HxW, e.g. 336x672,672x336. [default: LLaVA-NeXT's]")] = None,
    anyres_max: Annotated[Optional[int], typer.Option("--anyres-max", help="anyres: OneVision's anyres_max_N bilinear reduction of the grid map.")] = None,
    min_pixels: Annotated[Optional[int], typer.Option("--min-pixels", help="native: smart_resize min pixels. [default: 3136]")] = None,
    max_pixels: Annotated[Optional[int], typer.Option("--max-pixels", help="native: smart_resize max pixels. [default: 1003520]")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file, or start OUTDIR/ over.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; load no weights, read headers only.")] = False,
    as_json: JsonOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Extract multi-scale features of every image in INPUT into one file or a resumable folder of shards.

    Examples:
      s2 extract examples/images
      s2 extract photos/ --recipe llava-1.5-s2 -o photos.h5
      s2 extract 'shards/{00000..00099}.tar' --recipe llava-1.5-s2 -o feats/ --format safetensors
      s2 extract photos/ -m clip-vit-l-336 --random-init --scales 1,2,3 --dry-run --json
      s2 extract photos/ --recipe llava-next-anyres --random-init --dry-run --json
      s2 extract 'shards/{00000..00099}.tar' -o feats/ --devices all
      torchrun --nproc_per_node 8 -m s2cli extract 'shards/{00000..00099}.tar' -o feats/
    """
    from . import api

    with _reported(), _offline(offline):
        res = _settings(ctx.params)
        inp = api.open_inputs(res)  # checked (a missing input, key clashes) before any weights load
        if dry_run:
            plan = api.plan(input, config=res)
            print(json.dumps(plan)) if as_json else _print_plan(plan)
            return
        if devices is not None:
            return _extract_on_devices(ctx.params, devices, res, inp, as_json)
        summary = api.extract(inp, output, config=res, overwrite=overwrite,
                              progress=_BarProgress(show=not quiet))
    if as_json:
        print(json.dumps(summary.to_dict()))
    else:
        err.print(f"{summary.num_images} images, {summary.num_failed} failed -> {summary.output} "
                  f"({summary.images_per_s} img/s)", highlight=False)
    if summary.nothing_extracted:
        with _reported():
            raise S2Error(f"every sample failed ({summary.num_failed}), nothing was extracted",
                          given=str(input), expected="at least one readable image",
                          fix="read the failure records (`s2 inspect OUT --json` or OUTDIR/errors.jsonl); relative "
                              "paths in a .txt list resolve against the list's folder")


def _settings(values: dict):
    """The resolved settings of a command's parameters (those that are `s2 extract` options; the rest ignored)."""
    from dataclasses import fields

    from . import api
    from .config import ExtractConfig

    names = {f.name for f in fields(ExtractConfig)} - {"input", "output", "recipe", "provenance"}
    options = {k: v for k, v in values.items() if k in names}
    options.update(scales=_floats("scales", values.get("scales")), img_sizes=_ints("img-sizes", values.get("img_sizes")))
    return api.settings(values["input"], values.get("output"), recipe=values.get("recipe"), **options)


# `s2 bench` takes these options of `s2 extract` as they are declared there (names, help, defaults)
_BENCH_OPTIONS = ("recipe", "model", "weights", "offline", "random_init", "seed", "layer", "keep_cls", "scales", "img_sizes",
                  "max_split_size", "split_mode", "resize_output_to_idx", "fit", "antialias", "batch_size", "workers",
                  "max_tiles_per_call", "device", "precision", "dtype", "pool", "pool_only", "compile", "channels_last",
                  "decode", "input_format",
                  "image_key", "strategy", "min_tiles", "max_tiles", "thumbnail", "grid_pinpoints", "anyres_max",
                  "min_pixels", "max_pixels")


def _options_of(source, names: tuple[str, ...]):
    """Decorator: the command also takes `source`'s options `names`, declared once there; they arrive as **kw."""
    def wrap(fn):
        own = [p for p in signature(fn, eval_str=True).parameters.values() if p.kind is not p.VAR_KEYWORD]
        theirs = signature(source, eval_str=True).parameters
        fn.__signature__ = Signature(own + [theirs[n] for n in names])
        return fn
    return wrap


@app.command()
@_options_of(extract, _BENCH_OPTIONS)
def bench(
    input: Annotated[Optional[str], typer.Argument(help="A folder or list of images (default: synthetic JPEGs made in memory).")] = None,
    images: Annotated[int, typer.Option("--images", "-n", help="Images to time (synthetic, or the first N of INPUT).")] = 64,
    image_size: Annotated[str, typer.Option("--image-size", help="Synthetic JPEG size WxH.")] = "1024x768",
    as_json: JsonOpt = False,
    **kw,
) -> None:
    """Time `s2 extract` end to end (after a warm-up batch) against the bare engine on the same decoded images:
    img/s, FLOPs per image (torch's flop counter), MFU against a matmul measured here, stage seconds, peak memory.

    Examples:
      s2 bench -m timm:vit_tiny_patch16_224 --random-init --images 64
      s2 bench photos/ --recipe llava-1.5-s2 --random-init --device cuda --precision bf16 --compile --json
    """
    from .bench import bench as run_bench

    with _reported(), _offline(kw.pop("offline")):
        try:
            w, h = (int(v) for v in image_size.lower().split("x"))
        except ValueError:
            raise ConfigError("--image-size must be WxH", given=image_size, fix="e.g. --image-size 1024x768") from None
        kw["scales"], kw["img_sizes"] = _floats("scales", kw["scales"]), _ints("img-sizes", kw["img_sizes"])
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


@app.command()
def recipes(as_json: JsonOpt = False) -> None:
    """List the shipped recipes (use one with `s2 extract --recipe NAME`; flags override its values)."""
    from .config import list_recipes, load_recipe

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


@app.command()
def fetch(
    models: Annotated[Optional[list[str]], typer.Argument(help="Models: aliases, hf:org/name[@revision], timm:<name>, timm:hf-hub:org/name.", show_default=False)] = None,
    recipe: Annotated[Optional[list[str]], typer.Option("--recipe", help="Also the model of this recipe (repeatable).")] = None,
    offline: OfflineOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Download what runs of these models will need (config, preprocessor and weights only) into the HF cache
    ($HF_HOME), where there is network; print each one's revision and cache path. With --offline (or
    HF_HUB_OFFLINE=1), check that the cache holds them. Runs on machines that see this cache then work offline.

    Examples:
      s2 fetch clip-vit-l-336 dinov2-l
      s2 fetch --recipe llava-1.5-s2 --recipe vila-1.5-s2
      HF_HOME=/shared/hf s2 fetch hf:facebook/dinov2-with-registers-base@main
    """
    from . import api, hub

    with _reported(), _offline(offline):
        rows = api.fetch(*(models or ()), recipes=tuple(recipe or ()))
        if as_json:
            print(json.dumps(rows))
            return
        for r in rows:
            print(f"{r['model']}\t{r['revision'] or r['weights']}\t{r['path']}")  # tab-separated: cut -f3 gives the path
        env = " ".join(f"{k}={v}" for k, v in hub.cache_env().items())
        err.print(f"{len(rows)} model{'s' * (len(rows) != 1)} ready in {hub.cache_dir()}; without network: "
                  f"{env} HF_HUB_OFFLINE=1 s2 extract ...", highlight=False)


class _BarProgress:
    """`s2cli.extract`'s progress as a Rich bar on stderr (images/s, ETA when the total is known, failures,
    shards), on rank 0 only."""

    def __init__(self, show: bool = True) -> None:
        self.show, self.bar = show, None

    def start(self, res, total, done_before: int, shards_before: int, rank: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        if rank != 0 or not self.show:
            return
        self.before, self.shards_before = done_before, shards_before
        self.bar = Progress(TextColumn("[bold]extract"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]} img/s"), TimeRemainingColumn(),
                            TextColumn("{task.fields[failed]} failed"), TextColumn("{task.fields[shards]} shards"),
                            console=err, transient=False)
        self.task = self.bar.add_task("extract", total=total, completed=done_before, rate="-", failed=0,
                                      shards=shards_before)
        self.bar.start()

    def update(self, done: int, failed: int, shards: int) -> None:
        if self.bar is None:
            return
        elapsed = self.bar.tasks[self.task].elapsed or 0
        rate = f"{done / elapsed:.1f}" if elapsed > 0 else "-"
        self.bar.update(self.task, completed=self.before + done + failed, rate=rate, failed=failed,
                        shards=self.shards_before + shards)

    def note(self, message: str) -> None:
        err.print(message, highlight=False)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _print_plan(plan: dict) -> None:
    t = Table(title=f"plan: {plan['model']} sizes {plan['img_sizes']} split {plan['max_split_size']} fit {plan['fit']}")
    for c in ("key", "orig h×w", "tiles", "grids", "output (T, C)", "bytes"):
        t.add_column(c)
    for im in plan["images"]:
        t.add_row(im["key"], "×".join(map(str, im["orig_hw"])), str(im["tiles"]),
                  " ".join(f"{r}×{c}" for r, c in im["grids"]), str(tuple(im["output_shape"])), f"{im['bytes']:,}")
    out.print(t)
    flops = plan["flops_estimate"]
    out.print(f"{plan['num_images']} images, {plan['total_tiles']} tiles, "
              f"{'%.3g TFLOP' % (flops / 1e12) if flops is not None else 'FLOPs unknown'}, "
              f"{plan['total_bytes'] / 2**20:.1f} MiB of features -> {plan['output']}", highlight=False)
    for u in plan["unreadable"]:
        out.print(f"unreadable: {u['key']} ({u['error_class']}: {u['error']})", highlight=False)


@app.command("inspect")
def inspect_features(
    path: Annotated[str, typer.Argument(help="A .h5/.safetensors file or an output folder written by `s2 extract`.")],
    key: Annotated[Optional[str], typer.Option(help="Show one image's metadata and feature stats.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Summarize features: model, weights, scales, images, shape, shards, failures."""
    from .readers import open_features

    with _reported(), open_features(path) as ff:
        if key is not None:
            if key not in ff:
                raise ConfigError(f"no image with this key in {path}", given=key,
                                  fix="list keys with `python -c \"import s2cli; print(list(s2cli.open_features('PATH')))\"`")
            info = image_report(ff, key)
        else:
            info = file_report(ff)
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


def file_report(ff) -> dict:
    """`s2 inspect PATH`: the file attributes every output carries (config.FILE_ATTRS), counts, shape, size."""
    from .config import FILE_ATTRS, JSON_ATTRS
    from .readers import FeatureSet

    a = ff.attrs
    fails = ff.failures
    report = {
        "num_images": len(ff), "num_failed": len(fails),
        "failed": [{k: f[k] for k in ("key", "source", "stage", "error_class", "error")} for f in fails],
        "weights": a.get("weights"),
        **{k: json.loads(a.get(k, "null")) if k in JSON_ATTRS else a.get(k) for k in FILE_ATTRS},
        "feature_shape": ff.feature_shape, "dtype": ff.dtype, "s2cli_version": a.get("s2cli_version"),
    }
    report["pool"] = report["pool"] or "none"  # files written before --pool
    if isinstance(ff, FeatureSet):
        report.update(size_bytes=sum((ff.path / s["shard"]).stat().st_size for s in ff.shards),
                      num_shards=len(ff.shards), complete=ff.complete)
    else:
        report["size_bytes"] = Path(ff.path).stat().st_size
    return report


def image_report(ff, key: str) -> dict:
    import numpy as np

    m = ff.meta(key)
    try:
        x = np.asarray(ff[key], dtype=np.float64)
    except KeyError:  # --pool-only
        x = np.asarray(ff.pooled(key), dtype=np.float64)
    return {**m, "shape": list(x.shape), "mean": float(x.mean()), "std": float(x.std()),
            "finite": bool(np.isfinite(x).all())}


@app.command()
def export(
    path: Annotated[str, typer.Argument(help="A feature file or output folder written by `s2 extract`.")],
    out: Annotated[str, typer.Argument(help="New folder for img_emb/*.npy and metadata/*.parquet.")],
    pool: Annotated[str, typer.Option(help="auto (stored pooled vectors, else token mean) | pooled | mean.")] = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Export one vector per image for retrieval (the img_emb/ + metadata/ layout autofaiss reads)."""
    from .export import export_embeddings
    from .readers import open_features

    with _reported():
        if pool not in ("auto", "pooled", "mean"):
            raise ConfigError("--pool is not known", given=pool, expected="auto | pooled | mean", fix="pass --pool auto")
        with open_features(path) as ff:
            summary = export_embeddings(ff, out, pool)
    if as_json:
        print(json.dumps(summary))
    else:
        err.print(f"{summary['num_images']} vectors of {summary['dim']} ({summary['pool']}) -> {summary['output']}",
                  highlight=False)


@app.command()
def models(as_json: JsonOpt = False) -> None:
    """List model aliases with their defaults."""
    from .backbones import list_models

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


viz = typer.Typer(no_args_is_help=True, help="Pictures of a plan or of stored features (PNG).")
app.add_typer(viz, name="viz")


@viz.command("plan")
def viz_plan(
    image: Annotated[str, typer.Argument(help="An image file.")],
    output: Annotated[str, typer.Option("--output", "-o", help="The PNG to write.")] = "plan.png",
    recipe: Annotated[Optional[str], typer.Option(help="A recipe name or .yaml path; flags override it.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model alias or spec (its tile size and fit).")] = None,
    strategy: Annotated[Optional[str], typer.Option(help="s2 | dynamic-s2 | anyres | internvl | native | dual.")] = None,
    img_sizes: Annotated[Optional[str], typer.Option("--img-sizes", help="Absolute sizes per scale, e.g. 336,672,1008.")] = None,
    max_split_size: Annotated[Optional[int], typer.Option("--max-split-size", help="Tile size.")] = None,
    max_tiles: Annotated[Optional[int], typer.Option("--max-tiles", help="internvl, dynamic-s2: most tiles.")] = None,
    grid_pinpoints: Annotated[Optional[str], typer.Option("--grid-pinpoints", help="anyres: HxW canvases.")] = None,
    fit: Annotated[Optional[str], typer.Option(help="crop | squash | pad | keep (s2, dual).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Draw every scale's (or view's) tiles over IMAGE as the backbone sees it. No weights are loaded.

    Example:  s2 viz plan examples/images/chelsea.jpg --recipe llava-next-anyres -o plan.png
    """
    from .viz import plan_figure, plan_summary

    with _reported():
        if not Path(image).is_file():
            raise ConfigError("no such image", given=image, fix="pass an image file")
        res = _settings({**locals(), "input": image, "output": "viz.h5"})
        fig, panels = plan_figure(image, res)
        fig.save(output)
    if as_json:
        print(plan_summary(panels))
    else:
        err.print(f"{len(panels)} panels, {fig.width}x{fig.height} -> {output}", highlight=False)


@viz.command("features")
def viz_features(
    path: Annotated[str, typer.Argument(help="A feature file or output folder written by `s2 extract`.")],
    key: Annotated[str, typer.Option(help="The image's key.")],
    output: Annotated[str, typer.Option("--output", "-o", help="The PNG to write.")] = "pca.png",
    as_json: JsonOpt = False,
) -> None:
    """The image beside a PCA (3 components as RGB) of each scale's or view's feature map and of the merged map.

    Example:  s2 viz features images.efficientnet-lite0.h5 --key chelsea -o pca.png
    """
    from .readers import open_features
    from .viz import features_figure, plan_summary

    with _reported(), open_features(path) as ff:
        if key not in ff:
            raise ConfigError(f"no image with this key in {path}", given=key, fix="list keys with `s2 inspect PATH --json`")
        fig, panels = features_figure(ff, key)
        fig.save(output)
    if as_json:
        print(plan_summary(panels))
    else:
        err.print(f"{len(panels)} panels, {fig.width}x{fig.height} -> {output}", highlight=False)
# ---- many GPUs and nodes: --devices workers, s2 slurm, s2 status ---------------------------------------------------
# options of `extract` that describe one process's console, not the extraction: not forwarded to workers and jobs
_CONSOLE_ONLY = ("ctx", "devices", "dry_run", "as_json", "quiet")


def _option_argv(fn, values: dict, skip: tuple[str, ...] = ()) -> list[str]:
    """The command line that gives `fn`'s Typer parameters these values: arguments in order, options by their
    first long name; None (not set) and a plain flag left off are omitted, so a recipe's values stay in force."""
    hints = get_type_hints(fn, include_extras=True)
    argv: list[str] = []
    for name in signature(fn).parameters:
        if name in skip or values.get(name) is None:
            continue
        info = next((m for m in getattr(hints[name], "__metadata__", ()) if isinstance(m, ParameterInfo)), None)
        value = values[name]
        if isinstance(info, ArgumentInfo):
            argv.append(str(value))
            continue
        decls = [d for d in (info.default, *(info.param_decls or ())) if isinstance(d, str)] if info else []
        flag = next((d for d in decls if d.startswith("--")), "--" + name.replace("_", "-"))
        if isinstance(value, bool):
            on, _, off = flag.partition("/")
            if value or off:
                argv.append(on if value else off)
        elif isinstance(value, (list, tuple)):
            for v in value:
                argv += [flag, str(v)]
        else:
            argv += [flag, str(value)]
    return argv


def _extract_argv(values: dict) -> list[str]:
    """`python -m s2cli extract …` with the same extraction options as `values` (an extract call's params)."""
    return [sys.executable, "-m", "s2cli", "extract", *_option_argv(extract, values, _CONSOLE_ONLY)]


def _extract_on_devices(values: dict, devices: str, res, inp, as_json: bool) -> None:
    """--devices: one `s2 extract` worker process per device, as ranks of one run; wait for all; exit non-zero if
    any failed, after a per-worker report."""
    import os

    from .launch import parse_devices, run_workers

    if "RANK" in os.environ or "SLURM_STEP_ID" in os.environ:
        raise ConfigError("--devices starts its own workers, and this process is already one rank of a launcher",
                          given=devices, fix="drop --devices under torchrun/srun (they start one process per GPU)")
    if values.get("device") is not None:
        raise ConfigError("--device and --devices were both given", given=(values["device"], devices),
                          fix="pass --devices alone: each worker gets one of its devices")
    if not res.output_is_dir:
        raise ConfigError("--devices needs an output folder that the workers share", given=res.output, fix="pass -o OUTDIR/")
    devs = parse_devices(devices)
    if values.get("overwrite"):
        raise ConfigError("--overwrite cannot be used by several workers at once", given=devices,
                          fix=f"remove {res.output} first, then run without --overwrite")
    from . import api

    _, located = api.locate_weights(res)  # downloaded here once (first use), not by every worker at the same time
    err.print(f"{len(devs)} workers ({', '.join(devs)}) -> {res.output}; weights {located.record}", highlight=False)
    workers = run_workers(_extract_argv(values), devs, env={"HF_HUB_OFFLINE": "1"})
    from .status import status_report

    report = {"workers": workers, "status": status_report(res.output)}
    if as_json:
        print(json.dumps(report))
    else:
        t = Table(title=f"--devices {devices}")
        for c in ("rank", "device", "exit", "images", "failed", "shards", "img/s", "error"):
            t.add_column(c, overflow="fold")
        for w in workers:
            s = w["summary"] or {}
            t.add_row(str(w["rank"]), w["device"], str(w["exit_code"]), str(s.get("num_images", "-")),
                      str(s.get("num_failed", "-")), str(s.get("shards_written", "-")), str(s.get("images_per_s", "-")),
                      w["error"] or "")
        err.print(t)
        st = report["status"]
        err.print(f"{st['images']} images, {st['failed']} failed in {st['shards_done']} shards; "
                  f"{'complete' if st['complete'] else 'not complete'} -> {res.output}", highlight=False)
    bad = [w["exit_code"] for w in workers if w["exit_code"] != 0]
    if bad:
        raise typer.Exit(max(bad))


def _with_extract_options(fn):
    """Give a command every extraction option of `extract` (one definition, so `s2 slurm` forwards exactly what
    `extract` accepts) before its own parameters; `fn` receives them all as keyword arguments."""
    ext_hints = get_type_hints(extract, include_extras=True)
    own_hints = get_type_hints(fn, include_extras=True)
    params = [p.replace(annotation=ext_hints[n]) for n, p in signature(extract).parameters.items()
              if n not in _CONSOLE_ONLY]
    params += [p.replace(annotation=own_hints[n]) for n, p in signature(fn).parameters.items()
               if n != "extract_values"]
    extract_names = {p.name for p in params} - set(signature(fn).parameters)

    def command(**kw):
        return fn(**{k: v for k, v in kw.items() if k not in extract_names}, extract_values={
            k: v for k, v in kw.items() if k in extract_names})

    command.__signature__ = Signature(params)  # type: ignore[attr-defined]
    command.__name__, command.__doc__ = fn.__name__, fn.__doc__
    return command


def slurm(
    nodes: Annotated[int, typer.Option("--nodes", help="Nodes per job (per array task with --array).")] = 1,
    gpus_per_node: Annotated[int, typer.Option("--gpus-per-node", help="GPUs per node; one task (rank) per GPU.")] = 0,
    ntasks: Annotated[Optional[int], typer.Option("--ntasks", help="Tasks per job instead of nodes × GPUs (e.g. CPU tasks).")] = None,
    array: Annotated[Optional[int], typer.Option("--array", help="A job array of K jobs (--array=0-(K-1)), each --nodes × --gpus-per-node tasks.")] = None,
    partition: Annotated[Optional[str], typer.Option("--partition", help="sbatch --partition.")] = None,
    time_limit: Annotated[Optional[str], typer.Option("--time", help="sbatch --time, e.g. 24:00:00.")] = None,
    account: Annotated[Optional[str], typer.Option("--account", help="sbatch --account.")] = None,
    cpus_per_gpu: Annotated[Optional[int], typer.Option("--cpus-per-gpu", help="sbatch --cpus-per-gpu.")] = None,
    mem: Annotated[Optional[str], typer.Option("--mem", help="sbatch --mem (per node), e.g. 200G.")] = None,
    sbatch_arg: Annotated[Optional[list[str]], typer.Option("--sbatch-arg", help="Any other sbatch option, as one #SBATCH line (repeatable), e.g. --sbatch-arg=--qos=high.")] = None,
    job_name: Annotated[str, typer.Option("--job-name", help="sbatch --job-name.")] = "s2-extract",
    python: Annotated[Optional[str], typer.Option("--python", help="Python that runs s2cli on the nodes. [default: the one running s2]")] = None,
    submit: Annotated[bool, typer.Option("--submit", help="Submit the script with sbatch and print the job id.")] = False,
    as_json: JsonOpt = False,
    *, extract_values: dict,
) -> None:
    """Write a SLURM batch script that runs `s2 extract` as ranks of one run (srun: one task per GPU, or a job
    array), into OUTDIR/s2-slurm.sbatch; print it; --submit submits it. Every `s2 extract` option is forwarded.

    Examples:
      s2 slurm 'shards/{00000..09999}.tar' -o feats/ --recipe llava-1.5-s2 --nodes 4 --gpus-per-node 8 --time 24:00:00
      s2 slurm photos.txt -o feats/ --array 16 --gpus-per-node 1 --partition gpu --submit
    """
    import shlex
    import subprocess
    from pathlib import Path as _P

    from . import api
    from .slurm import SlurmJob, sbatch_script

    v = extract_values
    with _reported(), _offline(v.get("offline")):
        # validate everything a task would (config, recipe, input) before anything is written or submitted
        res = _settings(v)
        inp = api.open_inputs(res)
        if v.get("output") is None or not res.output_is_dir:
            raise ConfigError("s2 slurm needs an output folder that its tasks share", given=v.get("output"),
                              fix="pass -o OUTDIR/")
        from .outdir import OutputDir

        res, _ = api.locate_weights(res)  # the weights, downloaded here once (the tasks run offline) or checked
        if OutputDir(res.output).run_file.is_file():  # resubmitting: the tasks would refuse other settings, say so now
            OutputDir(res.output).check_same({"input": inp.describe(), "config": res.to_dict()}, res.compare_keys())
        if v.get("overwrite"):
            raise ConfigError("--overwrite cannot be forwarded to several ranks", fix=f"remove {res.output} first")
        job = SlurmJob(nodes=nodes, gpus_per_node=gpus_per_node, ntasks=ntasks, array=array, partition=partition,
                       time=time_limit, account=account, cpus_per_gpu=cpus_per_gpu, mem=mem,
                       sbatch_args=tuple(sbatch_arg or ()), job_name=job_name)
        outdir = _P(res.output).resolve()
        command = [python or sys.executable, *_extract_argv(v)[1:], "--json", "-q"]
        from .hub import cache_env

        script = sbatch_script(job, command, outdir, _P.cwd(), env={**cache_env(), "HF_HUB_OFFLINE": "1"})
        outdir.mkdir(parents=True, exist_ok=True)
        path = outdir / "s2-slurm.sbatch"
        path.write_text(script)
        job_id = None
        if submit:
            try:
                r = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
            except FileNotFoundError:
                raise ConfigError("sbatch is not on PATH", given=str(path),
                                  fix="run on a SLURM login node, or submit the script yourself: sbatch " + shlex.quote(str(path))) from None
            if r.returncode != 0:
                raise S2Error(f"sbatch refused the job: {r.stderr.strip()}", given=str(path),
                              fix="adjust the sbatch options (--partition, --account, --time, --sbatch-arg) and rerun")
            job_id = r.stdout.strip().split(";")[0]
    if as_json:
        print(json.dumps({"script": str(path), "job_id": job_id, "ranks": job.ranks, "text": script}))
        return
    out.print(script, highlight=False, markup=False, end="")
    err.print(f"wrote {path}", highlight=False)
    if job_id is not None:
        print(f"submitted job {job_id}; watch it with: s2 status {shlex.quote(str(outdir))}")


app.command("slurm")(_with_extract_options(slurm))


@app.command()
def status(
    path: Annotated[str, typer.Argument(help="An output folder (s2 extract -o OUTDIR/, s2 slurm -o OUTDIR).")],
    as_json: JsonOpt = False,
) -> None:
    """Progress of a run in an output folder: shards and units done, images, failures, throughput, each rank's
    state (running, done, failed, or stale: it stopped without saying so) and the units in flight."""
    from .status import status_report

    with _reported():
        st = status_report(path)
    if as_json:
        print(json.dumps(st))
        return
    t = Table(title=f"{st['output']} ({st['input']})")
    for c in ("rank", "state", "host", "pid", "shards", "images", "failed", "img/s", "in flight", "updated"):
        t.add_column(c, overflow="fold", no_wrap=c != "in flight")
    for r in st["ranks"]:
        fl = r["in_flight"]
        t.add_row(str(r["rank"]), r["state"], str(r["host"] or "-"), str(r["pid"] or "-"), str(r["shards"]),
                  str(r["images"]), str(r["failed"]), str(r["images_per_s"] or "-"),
                  f"{fl['unit']} part {fl['part']} -> {fl['shard']}" if fl else "-",
                  "-" if r["updated_s_ago"] is None else f"{r['updated_s_ago']}s ago")
    out.print(t)
    total = "?" if st["shards_total"] is None else st["shards_total"]
    out.print(f"shards {st['shards_done']}/{total}, units {st['units_done']}/{st['units_total']}, {st['images']} images, "
              f"{st['failed']} failed, {st['images_per_s'] or '-'} img/s overall, {st['images_per_s_now']} img/s now; "
              f"{'complete' if st['complete'] else 'not complete'}", highlight=False)
    for s in st["stale"]:
        out.print(f"stale: rank {s['rank']} ({s['host']} pid {s['pid']}) stopped in {s.get('unit') or 'no unit'}; "
                  f"rerun the same command (or resubmit) to redo it", highlight=False)
    for r in st["ranks"]:
        if r["state"] == "failed":
            out.print(f"rank {r['rank']} failed: {r['error']}", highlight=False)


@app.callback(invoke_without_command=True)
def _root(version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False) -> None:
    if version:
        print(__version__)
        raise typer.Exit(0)


def main() -> None:
    app(prog_name="s2")

