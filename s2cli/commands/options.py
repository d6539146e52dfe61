"""One declaration per option of `s2 extract`, shared by every command that takes it (extract, bench, slurm, viz
plan), as huggingface_hub's CLI shares its options: the flag names, the help, the panel it is listed in, the
default shown in --help (taken from `ExtractConfig`, while the value stays None = "not set", so a recipe's value
is not overridden by a default) and, for a choice, the allowed values (listed in --help and offered by shell
completion; checked by the config, which says what was given and the fix)."""
from __future__ import annotations

from dataclasses import fields
from inspect import Parameter, Signature, signature
from typing import Annotated, Any, Callable, Iterable, Optional

import typer

from .. import formats
from ..config import DEFAULT_SCALES, DTYPES, ON_ERROR, POOLS, PRECISIONS, ExtractConfig
from ..sources import DECODES, FITS, INPUT_FORMATS
from ..strategies import STRATEGIES
from ..tiling import SPLIT_MODES

INPUT, MODEL, SCALES, STRATEGY, OUTPUT, SPEED, RUN = ("Input", "Model", "Scales and tiles", "Strategy", "Output",
                                                      "Speed", "Run control")


def _complete(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    return lambda incomplete: [c for c in choices if c.startswith(incomplete)]


def option(*decls: str, help: str, panel: str, field: str | None = None, shown: str | None = None,
           choices: tuple[str, ...] = ()) -> Any:
    """A Typer option in `panel`. Its default is the parameter's (ExtractConfig's value of `field`, given as the
    command's default: `D.<field>`), shown as is; an option whose default depends on the model has None and
    says so in `shown`."""
    kw: dict[str, Any] = {"help": help, "rich_help_panel": panel}
    if shown is not None:
        kw["show_default"] = shown
    if choices:
        kw.update(metavar="|".join(choices), autocompletion=_complete(choices))
    return typer.Option(*decls, **kw)


def _flag(on: str, off: str, help: str, panel: str, field: str, shown: str | None = None) -> Any:
    return option(f"{on}/{off}", help=help, panel=panel, field=field, shown=shown)


# every option, in the order --help lists them within a panel: name -> (annotation, default). An option's default
# is ExtractConfig's (None where the model decides, said in its `shown` text); the others' is off.
OPTIONS: dict[str, tuple[Any, Any]] = {}


def declare(name: str, typ: Any, info: Any) -> Any:
    """Declare the option `name` (an ExtractConfig field, or a console option of a command) once, for every
    command that takes it (`with_options`)."""
    annotation = Annotated[typ, info]
    default = getattr(ExtractConfig, name, None) if name in {f.name for f in fields(ExtractConfig)} else (
        False if typ is bool else None)
    OPTIONS[name] = (annotation, default)
    return annotation


def with_options(names: Iterable[str] | None = None, skip: Iterable[str] = ()) -> Callable[[Any], Any]:
    """Decorator: the command takes these declared options (all, by default) besides its own parameters; they
    arrive as keyword arguments. One declaration serves `extract`, `bench`, `slurm` and `viz plan`."""
    def wrap(fn: Any) -> Any:
        own = [p for p in signature(fn, eval_str=True).parameters.values() if p.kind is not p.VAR_KEYWORD]
        taken = {p.name for p in own} | set(skip)
        extra = [Parameter(n, Parameter.KEYWORD_ONLY, annotation=OPTIONS[n][0], default=OPTIONS[n][1])
                 for n in (names or OPTIONS) if n not in taken]
        fn.__signature__ = Signature(own + extra)
        return fn
    return wrap


Str, Int, Float, Bool = Optional[str], Optional[int], Optional[float], Optional[bool]

# ---- input ------------------------------------------------------------------------------------------------------
Input = Annotated[str, typer.Argument(help="A folder (recursive), a .txt/.csv/.parquet list, or WebDataset shards "
                                            "('s/{000..009}.tar', a glob, a folder of .tar, pipe:CMD).")]
InputFormat = declare("input_format", Str, option("--input-format", help="What INPUT is (auto: detected).", panel=INPUT,
                                    field="input_format", choices=INPUT_FORMATS))
ImageKey = declare("image_key", Str, option("--image-key", help="WebDataset image member extensions, in order.", panel=INPUT,
                                 shown="jpg;jpeg;png;webp"))
MetaColumns = declare("meta_columns", Str, option("--meta-columns", help="A .csv/.parquet list's other columns kept as "
                                                 "each image's metadata: all | none | col,col.", panel=INPUT,
                                                 field="meta_columns"))
KeepExt = declare("keep_ext", Bool, _flag("--keep-ext", "--drop-ext", "Keys keep the file extension (cats/001.jpg, as "
                                          "LLaVA's data JSON names images).", INPUT, "keep_ext"))
NumSamples = declare("num_samples", Int, option("--num-samples", help="WebDataset: samples in all shards, for the progress "
                                    "total and ETA (else estimated from the tars read so far).", panel=INPUT))
Fps = declare("fps", Float, option("--fps", help="Video: frames at F per second, by timestamps (docs/video.md).",
                                   panel=INPUT))
NumFrames = declare("num_frames", Int, option("--num-frames", help="Video: N frames uniformly over the clip "
                                              "(numpy.linspace, as LLaVA-OneVision).", panel=INPUT))
MaxFrames = declare("max_frames", Int, option("--max-frames", help="Video: at most M frames (uniform subsampling).",
                                              panel=INPUT))
FramesAsImages = declare("frames_as_images", Bool, _flag("--frames-as-images", "--frames-as-video", "Video: store each "
                                                         "frame as its own entry key#000123.", INPUT, "frames_as_images"))
Limit = declare("limit", Int, option("--limit", help="Only the first N images.", panel=INPUT))
# ---- model ------------------------------------------------------------------------------------------------------
Recipe = declare("recipe", Str, option("--recipe", help="A recipe name (see `s2 recipes`) or .yaml path; options override it.",
                               panel=MODEL))
Model = declare("model", Str, option("--model", "-m", help="Alias (see `s2 models`), timm:<name> or hf:<hub id[@revision] or dir>; hub weights "
                              "download on first use.",
                              panel=MODEL, field="model"))
Offline = declare("offline", bool, option("--offline", help="Never reach the hub: weights come from the HF cache only (as "
                                        "HF_HUB_OFFLINE=1).", panel=MODEL))
Weights = declare("weights", Str, option("--weights", help="Local checkpoint (.safetensors/.pth: plain, state_dict/model-"
                                          "nested, DDP, EMA) or save_pretrained dir.", panel=MODEL))
RandomInit = declare("random_init", Bool, _flag("--random-init", "--no-random-init", "No weights: initialize from --seed (dry "
                                   "runs, tests).", MODEL, "random_init"))
Seed = declare("seed", Int, option("--seed", help="Seed for --random-init.", panel=MODEL, field="seed"))
Layer = declare("layer", Int, option("--layer", help="Hidden layer (-1: final features).", panel=MODEL, shown="the model's"))
KeepCls = declare("keep_cls", Bool, _flag("--keep-cls", "--drop-cls", "Keep CLIP's CLS token as a prefix token.", MODEL,
                                "keep_cls"))
# ---- scales and tiles -------------------------------------------------------------------------------------------
Scales = declare("scales", Str, option("--scales", help="Scales times the model's input size, e.g. 1,2,3.", panel=SCALES,
                               shown=",".join(f"{s:g}" for s in DEFAULT_SCALES)))
ImgSizes = declare("img_sizes", Str, option("--img-sizes", help="Absolute sizes per scale, e.g. 336,672,1008 (instead of "
                                 "--scales).", panel=SCALES))
MaxSplitSize = declare("max_split_size", Int, option("--max-split-size", help="Tile size.", panel=SCALES,
                                     shown="the model's input size"))
SplitMode = declare("split_mode", Str, option("--split-mode", help="How non-square images are tiled.", panel=SCALES,
                                  field="split_mode", choices=SPLIT_MODES))
ResizeOutputToIdx = declare("resize_output_to_idx", Int, option("--resize-output-to-idx", help="Scale whose grid the output takes.",
                                          panel=SCALES, field="resize_output_to_idx"))
Fit = declare("fit", Str, option("--fit", help="How an image is brought to the largest scale.", panel=SCALES,
                            shown="the model's processor", choices=FITS))
Antialias = declare("antialias", Bool, _flag("--antialias", "--no-antialias", "Antialias bicubic downscaling between scales.",
                                  SCALES, "antialias"))
# ---- strategy ---------------------------------------------------------------------------------------------------
Strategy = declare("strategy", Str, option("--strategy", help="S² or a dynamic-resolution strategy (see docs/strategies.md).",
                                 panel=STRATEGY, field="strategy", choices=tuple(STRATEGIES)))
MinTiles = declare("min_tiles", Int, option("--min-tiles", help="internvl: fewest tiles.", panel=STRATEGY, shown="1"))
MaxTiles = declare("max_tiles", Int, option("--max-tiles", help="internvl, dynamic-s2: most tiles (of the last scale).",
                                 panel=STRATEGY, shown="12"))
Thumbnail = declare("thumbnail", Bool, option("--thumbnail/--no-thumbnail", help="internvl: append a squashed thumbnail when "
                                   "there is more than one tile.", panel=STRATEGY, shown="thumbnail"))
GridPinpoints = declare("grid_pinpoints", Str, option("--grid-pinpoints", help="anyres: candidate canvases HxW, e.g. "
                                      "336x672,672x336.", panel=STRATEGY, shown="LLaVA-NeXT's"))
AnyresMax = declare("anyres_max", Int, option("--anyres-max", help="anyres: OneVision's anyres_max_N bilinear reduction of the "
                                  "grid map.", panel=STRATEGY))
MinPixels = declare("min_pixels", Int, option("--min-pixels", help="native: smart_resize min pixels.", panel=STRATEGY,
                                  shown="3136"))
MaxPixels = declare("max_pixels", Int, option("--max-pixels", help="native: smart_resize max pixels.", panel=STRATEGY,
                                  shown="1003520"))
# ---- output -----------------------------------------------------------------------------------------------------
Output = declare("output", Str, option("--output", "-o", help="A .h5/.safetensors file, or OUTDIR/ for resumable shards.",
                               panel=OUTPUT, shown="<input>.<model>.h5 here"))
Format = declare("format", Str, option("--format", help="Shard format in OUTDIR/ (a file's suffix says it).", panel=OUTPUT,
                               shown="h5", choices=formats.names()))
ShardSize = declare("shard_size", Int, option("--shard-size", help="Images per output shard.", panel=OUTPUT,
                                  shown="~1 GB files"))
Dtype = declare("dtype", Str, option("--dtype", help="Stored dtype: float32, float16, bfloat16, or int8/float8 codes "
                                    "with per-channel x per-token scales (~1/4 of float32); readers decode to float32 "
                                    "(docs/features.md).", panel=OUTPUT, field="dtype", choices=DTYPES))
Pool = declare("pool", Str, option("--pool", help="Also store a pooled vector per image.", panel=OUTPUT, field="pool",
                             choices=POOLS))
PoolOnly = declare("pool_only", Bool, _flag("--pool-only", "--with-tokens", "Store only the pooled vectors.", OUTPUT,
                                 "pool_only"))
Reduce = declare("reduce", Str, option("--reduce", help="Reduce each image's token grid before it is stored: avg:K (KxK "
                                      "area pooling) | s2c:K (KxK neighbours on channels, NVILA/Qwen2-VL) | budget:N "
                                      "(bilinear to <= N tokens, LLaVA-OneVision); see docs/features.md.", panel=OUTPUT))
Overwrite = declare("overwrite", bool, option("--overwrite", help="Replace an existing output file, or start OUTDIR/ over.",
                                   panel=OUTPUT))
# ---- speed ------------------------------------------------------------------------------------------------------
BatchSize = declare("batch_size", Int, option("--batch-size", "-b", help="Images per batch.", panel=SPEED, field="batch_size"))
Workers = declare("workers", Int, option("--workers", "-j", help="Decode worker processes (0: in the main process).",
                                panel=SPEED, field="workers"))
MaxTilesPerCall = declare("max_tiles_per_call", Int, option("--max-tiles-per-call", help="Cap on tiles per backbone call.", panel=SPEED))
Device = declare("device", Str, option("--device", help="auto | cpu | cuda | cuda:K.", panel=SPEED, field="device"))
Devices = declare("devices", Str, option("--devices", help="One worker process per device on this machine: all | 0,1,2,3 | "
                                "cpu,cpu (needs -o OUTDIR/).", panel=SPEED))
Precision = declare("precision", Str, option("--precision", help="Compute precision.", panel=SPEED, field="precision",
                                  choices=PRECISIONS))
Compile = declare("compile", Bool, _flag("--compile", "--no-compile", "torch.compile the backbone (dynamic=False; the first "
                                "batch of each tile size compiles).", SPEED, "compile"))
ChannelsLast = declare("channels_last", Bool, _flag("--channels-last", "--no-channels-last", "channels_last (NHWC) weights and "
                                     "inputs.", SPEED, "channels_last", shown="on for ConvNets, off for ViTs"))
Decode = declare("decode", Str, option("--decode", help="pil: Pillow in the workers; torch: JPEGs decoded and fitted on the "
                               "device (nvJPEG on CUDA; not bit-identical to Pillow; S² only).", panel=SPEED,
                               field="decode", choices=DECODES))
# ---- run control ------------------------------------------------------------------------------------------------
OnError = declare("on_error", Str, option("--on-error", help="skip: record the failure and go on; stop: exit at the first.",
                                panel=RUN, field="on_error", choices=ON_ERROR))
MaxFailures = declare("max_failures", Int, option("--max-failures", help="Exit non-zero once more samples than this have failed.",
                                    panel=RUN))
DecodeTimeout = declare("decode_timeout", Float, option("--decode-timeout", help="Seconds before a stalled decode is recorded as "
                                        "failed.", panel=RUN, field="decode_timeout"))
CheckFinite = declare("check_finite", Bool, _flag("--check-finite", "--no-check-finite", "Record images whose features hold "
                                    "NaN/Inf instead of storing them.", RUN, "check_finite"))
Retries = declare("retries", Int, option("--retries", help="Try a read that fails with an I/O error (OSError) again up "
                              "to N times, waiting 0.2 s, 0.4 s, ... (network file systems).", panel=RUN, field="retries"))
RetryFailed = declare("retry_failed", Bool, _flag("--retry-failed", "--no-retry-failed", "Extract again only the images "
                                    "OUTDIR/ records as failed (fixed since?): those that succeed are added as shards "
                                    "of their own; nothing else changes (docs/clusters.md).", RUN, "retry_failed"))
DryRun = declare("dry_run", bool, option("--dry-run", help="Print the plan; load no weights, read headers only.", panel=RUN))
Json = declare("as_json", bool, typer.Option("--json", help="Print machine-readable JSON on stdout."))
Quiet = declare("quiet", bool, option("--quiet", "-q", help="No progress bar.", panel=RUN))
