"""Config: the frozen settings of one extraction, built as defaults < recipe < flags (a flag left unset is None
and does not override the recipe), then resolved against the backbone; the resolved config is saved with the
output, with where each value came from."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field, fields
from importlib import resources
from numbers import Integral, Real
from pathlib import Path
from typing import Any

from . import formats
from .backbones import BackboneCfg, resolve
from .dtypes import DTYPES, QUANTIZED, entry_bytes, itemsize, pooled_dtype
from .errors import ConfigError
from .inputs.decode import DECODES
from .inputs.resolve import INPUT_FORMATS
from .layers import parse_layers
from .pixels import FITS
from .reduce import parse as parse_reduce
from .store import check_url, local_of
from .strategies import (
    SHAPE_OPTIONS,
    STRATEGIES,
    BackboneFacts,
    StrategyArgs,
    StrategyCfg,
    parse_pinpoints,
    resolve_strategy,
)
from .tiling import SPLIT_MODES
from .version import __version__
from .video import Sampling

PRECISIONS = ("fp32", "bf16", "fp16")
POOLS = ("none", "mean", "cls", "embed")
ON_ERROR = ("skip", "stop")
SHARD_BYTES = 1 << 30  # default shard size aims at ~1 GiB files
DEFAULT_SCALES = (1.0, 2.0)  # times the model's input size, when neither --scales nor --img-sizes is given

# the panels `s2 extract --help` lists its options in
PANELS = INPUT, MODEL, SCALES, STRATEGY, OUTPUT, SPEED, RUN = ("Input", "Model", "Scales and tiles", "Strategy",
                                                               "Output", "Speed", "Run control")
# what a resumed run does with an option (each option's `resume`):
COMPARED = "compared"  # saved with the output; a resumed run must give the same value (it changes what is stored)
RUN_ONLY = "run-only"  # saved; decides only how fast a run goes or when it stops: a resumed run may change it
IN_STRATEGY = "in strategy"  # saved and compared inside the strategy's resolved settings (`strategy`)
IN_BACKBONE = "in backbone"  # saved and compared inside the backbone's description (`backbone`)
AS_ASKED = "as asked"  # saved as given, not compared: what it decides is compared (scales: img_sizes; output: the
# folder itself; recipe: its values; input: run.json's `input`)
RESUME = (COMPARED, RUN_ONLY, IN_STRATEGY, IN_BACKBONE, AS_ASKED)


@dataclass(frozen=True)
class Opt:
    """One option of `s2 extract`, declared once (as its ExtractConfig field's metadata): the flags (a switch as
    "--on/--off"; none for the input argument), the help, the --help panel, the default shown where it is None
    ("not set": the model's or the strategy's decides), the allowed values, and what a resumed run does with it.
    The CLI's options, their checks' messages, the saved config and the resume comparison all read it."""

    flags: tuple[str, ...]
    help: str
    panel: str
    resume: str
    choices: Any = ()  # a tuple, or a registry (a dict: its names as they are when asked, a format added later too)
    shown: str | None = None
    added: bool = False  # added after outputs were first written: saved only when set otherwise, so those resume

    @property
    def flag(self) -> str:
        """The option's name in messages: its first long flag (a switch: both, "--keep-cls/--drop-cls")."""
        return next((f for f in self.flags if f.startswith("--")), self.flags[0] if self.flags else "INPUT")

    @property
    def allowed(self) -> tuple[str, ...]:
        """The values it takes (empty: any)."""
        return tuple(self.choices)


def opt(*flags: str, help: str, panel: str, resume: str = COMPARED, default: Any = None,
        choices: Any = (), shown: str | None = None, added: bool = False) -> Any:
    """An ExtractConfig field declaring its option (see `Opt`)."""
    assert resume in RESUME, resume
    decl = Opt(flags, help, panel, resume, choices, shown, added)
    return field(default=default, metadata={"opt": decl})


@dataclass(frozen=True)
class ExtractConfig:
    """What the user asked for. None means "not set": the model's default applies. Every field declares its option
    (`opt`): flags, help, panel, choices and what a resumed run does with it (`OPTION_DECLS`)."""

    input: str = opt(help="A folder (recursive), an image or video file, a glob of them ('photos/**/*.png'), a "
                     ".txt/.csv/.parquet list, .parquet/Arrow tables, hf://datasets/ORG/NAME, or WebDataset shards "
                     "('s/{000..009}.tar', a folder of .tar, pipe:CMD).", panel=INPUT, resume=AS_ASKED, default=dataclasses.MISSING)
    output: str | None = opt("--output", "-o", help="A .h5/.safetensors file, or OUTDIR/ for resumable shards.",
                             panel=OUTPUT, resume=AS_ASKED, shown="<input>.<model>.h5 here")
    model: str = opt("--model", "-m", default="efficientnet-lite0", panel=MODEL,
                     help="Alias (see `s2 models`), timm:<name> or hf:<hub id[@revision] or dir>; hub weights download "
                          "on first use.")
    weights: str | None = opt("--weights", panel=MODEL, help="Local checkpoint (.safetensors/.pth: plain, state_dict/"
                              "model-nested, DDP, EMA) or save_pretrained dir.")
    random_init: bool = opt("--random-init/--no-random-init", default=False, panel=MODEL,
                            help="No weights: initialize from --seed (dry runs, tests).")
    seed: int = opt("--seed", default=0, help="Seed for --random-init.", panel=MODEL)
    layer: int | None = opt("--layer", help="Hidden layer (-1: final features).", panel=MODEL, shown="the model's")
    layers: tuple[int, ...] | None = opt("--layers", panel=MODEL, added=True,
                                         help="Several hidden layers from one forward, each through the same merge: "
                                              "-1,-2,-12 or -4:-1 (both ends included); stored with a layer axis "
                                              "(docs/features.md).")
    keep_cls: bool = opt("--keep-cls/--drop-cls", default=False, help="Keep CLIP's CLS token as a prefix token.",
                         panel=MODEL, resume=IN_BACKBONE)
    scales: tuple[float, ...] | None = opt("--scales", help="Scales times the model's input size, e.g. 1,2,3 (saved as "
                                           "given; the sizes they make are compared on resume).", panel=SCALES,
                                           resume=AS_ASKED, shown=",".join(f"{s:g}" for s in DEFAULT_SCALES))
    img_sizes: tuple[int, ...] | None = opt("--img-sizes", help="Absolute sizes per scale, e.g. 336,672,1008 (instead "
                                            "of --scales).", panel=SCALES)
    max_split_size: int | None = opt("--max-split-size", help="Tile size.", panel=SCALES,
                                     shown="the model's input size")
    split_mode: str = opt("--split-mode", default="resize", help="How non-square images are tiled.", panel=SCALES,
                          choices=SPLIT_MODES)
    resize_output_to_idx: int = opt("--resize-output-to-idx", default=0, help="Scale whose grid the output takes.",
                                    panel=SCALES)
    fit: str | None = opt("--fit", help="How an image is brought to the largest scale.", panel=SCALES,
                          shown="the model's processor", choices=FITS)
    antialias: bool = opt("--antialias/--no-antialias", default=False, panel=SCALES,
                          help="Antialias bicubic downscaling between scales.")
    batch_size: int = opt("--batch-size", "-b", default=8, help="Images per batch.", panel=SPEED, resume=RUN_ONLY)
    workers: int = opt("--workers", "-j", default=2, help="Decode worker processes (0: in the main process).",
                       panel=SPEED, resume=RUN_ONLY)
    prefetch_factor: int | None = opt("--prefetch-factor", panel=SPEED, resume=RUN_ONLY, added=True,
                                      help="Samples each decode worker decodes ahead (torch DataLoader's "
                                           "prefetch_factor).", shown="two batches in flight, at least 4")
    max_tiles_per_call: int | None = opt("--max-tiles-per-call", help="Cap on tiles per backbone call.", panel=SPEED,
                                         resume=RUN_ONLY)
    device: str = opt("--device", default="auto", help="auto | cpu | cuda | cuda:K.", panel=SPEED, resume=RUN_ONLY)
    precision: str = opt("--precision", default="fp32", help="Compute precision.", panel=SPEED, choices=PRECISIONS)
    dtype: str = opt("--dtype", default="float32", panel=OUTPUT, choices=DTYPES,
                     help="Stored dtype: float32, float16, bfloat16, or int8/float8 codes with per-channel x per-token "
                          "scales (~1/4 of float32); readers decode to float32 (docs/features.md).")
    limit: int | None = opt("--limit", help="Only the first N images.", panel=INPUT)
    input_format: str = opt("--input-format", default="auto", help="What INPUT is (auto: detected).", panel=INPUT,
                            choices=INPUT_FORMATS)
    image_key: str | None = opt("--image-key", help="WebDataset image member extensions, in order.", panel=INPUT,
                                shown="jpg;jpeg;png;webp")
    meta_columns: str = opt("--meta-columns", default="all", panel=INPUT, added=True,
                            help="A .csv/.parquet list's other columns kept as each image's metadata: all | none | "
                                 "col,col.")
    image_column: str | None = opt("--image-column", panel=INPUT, added=True,
                                   help="Tables: the image column (bytes, a path, or an HF Image struct; default: "
                                        "image, jpg, png, ...).")
    key_column: str | None = opt("--key-column", panel=INPUT, added=True,
                                 help="Tables: the key column (default: key, else row numbers).")
    keep_ext: bool = opt("--keep-ext/--drop-ext", default=False, panel=INPUT, added=True,
                         help="Keys keep the file extension (cats/001.jpg, as LLaVA's data JSON names images).")
    fps: float | None = opt("--fps", help="Video: frames at F per second, by timestamps (docs/video.md).", panel=INPUT,
                            added=True)
    num_frames: int | None = opt("--num-frames", panel=INPUT, added=True,
                                 help="Video: N frames uniformly over the clip (numpy.linspace, as LLaVA-OneVision).")
    max_frames: int | None = opt("--max-frames", help="Video: at most M frames (uniform subsampling).", panel=INPUT,
                                 added=True)
    frames_as_images: bool = opt("--frames-as-images/--frames-as-video", default=False, panel=INPUT, added=True,
                                 help="Video: store each frame as its own entry key#000123.")
    format: str | None = opt("--format", help="Shard format in OUTDIR/ (a file's suffix says it).", panel=OUTPUT,
                             shown="h5", choices=formats.FORMATS)
    shard_size: int | None = opt("--shard-size", help="Images per output shard.", panel=OUTPUT, shown="~1 GB files")
    pool: str = opt("--pool", default="none", help="Also store a pooled vector per image.", panel=OUTPUT,
                    choices=POOLS)
    pool_only: bool = opt("--pool-only/--with-tokens", default=False, help="Store only the pooled vectors.",
                          panel=OUTPUT)
    on_error: str = opt("--on-error", default="skip", panel=RUN, resume=RUN_ONLY, choices=ON_ERROR,
                        help="skip: record the failure and go on; stop: exit at the first.")
    max_failures: int | None = opt("--max-failures", help="Exit non-zero once more samples than this have failed.",
                                   panel=RUN, resume=RUN_ONLY)
    decode_timeout: float = opt("--decode-timeout", default=120.0, panel=RUN, resume=RUN_ONLY,
                                help="Seconds before a stalled decode is recorded as failed.")
    # compared: with it off, features holding NaN/Inf are stored where a checked run records them as failed
    check_finite: bool = opt("--check-finite/--no-check-finite", default=True, panel=RUN,
                             help="Record images whose features hold NaN/Inf instead of storing them.")
    retries: int = opt("--retries", default=0, panel=RUN, resume=RUN_ONLY, added=True,
                       help="Try a read that fails with an I/O error (OSError) again up to N times, waiting 0.2 s, "
                            "0.4 s, ... (network file systems).")
    retry_failed: bool = opt("--retry-failed/--no-retry-failed", default=False, panel=RUN, resume=RUN_ONLY, added=True,
                             help="Extract again only the images OUTDIR/ records as failed (fixed since?): those that "
                                  "succeed are added as shards of their own; nothing else changes (docs/clusters.md).")
    num_samples: int | None = opt("--num-samples", panel=INPUT, resume=RUN_ONLY, added=True,
                                  help="WebDataset: samples in all shards, for the progress total and ETA (else "
                                       "estimated from the tars read so far).")
    compile: bool = opt("--compile/--no-compile", default=False, panel=SPEED, resume=RUN_ONLY,
                        help="torch.compile the backbone (dynamic=False; the first batch of each tile size compiles).")
    channels_last: bool | None = opt("--channels-last/--no-channels-last", panel=SPEED, resume=RUN_ONLY,
                                     help="channels_last (NHWC) weights and inputs.", shown="on for ConvNets, off for ViTs")
    reduce: str | None = opt("--reduce", panel=OUTPUT, added=True,
                             help="Reduce each image's token grid before it is stored: avg:K (KxK area pooling) | s2c:K "
                                  "(KxK neighbours on channels, NVILA/Qwen2-VL) | budget:N (bilinear to <= N tokens, "
                                  "LLaVA-OneVision); see docs/features.md.")
    decode: str = opt("--decode", default="pil", panel=SPEED, choices=DECODES, added=True,
                      help="pil: Pillow in the workers; torch: JPEGs decoded and fitted on the device (nvJPEG on CUDA; "
                           "not bit-identical to Pillow; S² only).")
    recipe: str | None = opt("--recipe", help="A recipe name (see `s2 recipes`) or .yaml path; options override it.",
                             panel=MODEL, resume=AS_ASKED)
    # dynamic-resolution strategies (strategies.py); None = the strategy's own default (StrategyCfg's)
    strategy: str = opt("--strategy", default="s2", panel=STRATEGY, resume=IN_STRATEGY, choices=STRATEGIES,
                        help="S² or a dynamic-resolution strategy (see docs/strategies.md).")
    min_tiles: int | None = opt("--min-tiles", help="internvl: fewest tiles.", panel=STRATEGY, resume=IN_STRATEGY,
                                shown=str(StrategyCfg.min_tiles))
    max_tiles: int | None = opt("--max-tiles", help="internvl, dynamic-s2: most tiles (of the last scale).",
                                panel=STRATEGY, resume=IN_STRATEGY, shown=str(StrategyCfg.max_tiles))
    thumbnail: bool | None = opt("--thumbnail/--no-thumbnail", panel=STRATEGY, resume=IN_STRATEGY, shown="thumbnail",
                                 help="internvl: append a squashed thumbnail when there is more than one tile.")
    grid_pinpoints: tuple[tuple[int, int], ...] | None = opt(  # (h, w) each
        "--grid-pinpoints", help="anyres: candidate canvases HxW, e.g. 336x672,672x336.", panel=STRATEGY,
        resume=IN_STRATEGY, shown="LLaVA-NeXT's")
    anyres_max: int | None = opt("--anyres-max", panel=STRATEGY, resume=IN_STRATEGY,
                                 help="anyres: OneVision's anyres_max_N bilinear reduction of the grid map.")
    min_pixels: int | None = opt("--min-pixels", help="native: smart_resize min pixels.", panel=STRATEGY,
                                 resume=IN_STRATEGY, shown=str(StrategyCfg.min_pixels))
    max_pixels: int | None = opt("--max-pixels", help="native: smart_resize max pixels.", panel=STRATEGY,
                                 resume=IN_STRATEGY, shown=str(StrategyCfg.max_pixels))
    provenance: tuple[tuple[str, str], ...] = ()  # (field, "recipe" | "flag") for every value not a default; no option

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# every option's declaration, by field name, in the order --help lists them within a panel
OPTION_DECLS: dict[str, Opt] = {f.name: f.metadata["opt"] for f in fields(ExtractConfig) if "opt" in f.metadata}


def flag(name: str) -> str:
    """The option `name` (a field) as messages name it: "--max-tiles", "--keep-cls/--drop-cls"."""
    return OPTION_DECLS[name].flag


_TUPLE_FIELDS = {"scales": float, "img_sizes": int}


def list_recipes() -> dict[str, Path]:
    """Recipes shipped with s2cli (the repository's recipes/, installed as the package data of s2cli.recipes), by
    name."""
    try:
        root = resources.files("s2cli.recipes")
    except ModuleNotFoundError:  # a checkout on sys.path without an install: the folder itself
        root = Path(__file__).resolve().parent.parent / "recipes"
    return {Path(str(p)).stem: Path(str(p)) for p in root.iterdir() if str(p).endswith(".yaml")}


def recipe_path(name_or_path: str) -> Path:
    """A shipped recipe's file by name, or a user's .yaml path."""
    shipped = list_recipes()
    if name_or_path in shipped:
        return shipped[name_or_path]
    if not Path(name_or_path).is_file():
        raise ConfigError("unknown recipe", given=name_or_path,
                          expected="one of " + ", ".join(sorted(shipped)) + " or a .yaml path",
                          fix="run `s2 recipes` to list them")
    return Path(name_or_path)


def recipe_text(name_or_path: str) -> str:
    """A recipe's YAML as written."""
    return recipe_path(name_or_path).read_text()


def load_recipe(name_or_path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A recipe by name or path -> (its config values, the whole file). Unknown keys are an error."""
    import yaml

    path = recipe_path(name_or_path)
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}", fix="fix the file") from None
    values = doc.get("config", {}) if isinstance(doc, dict) else None
    if not isinstance(values, dict):
        raise ConfigError(f"recipe {path} has no `config:` mapping", fix="put the settings under `config:`")
    known = {f.name for f in fields(ExtractConfig)} - {"input", "output", "recipe", "provenance"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"recipe {path} sets unknown keys", given=unknown, expected="extract options",
                          fix="use option names with underscores, e.g. max_split_size")
    return values, doc


def build_config(input: str, output: str | None = None, recipe: str | None = None, **flags: Any) -> ExtractConfig:
    """defaults < recipe < flags. A flag of None is "not set"."""
    values: dict[str, Any] = {}
    prov: dict[str, str] = {}
    if recipe:
        rvals, _ = load_recipe(recipe)
        values.update(rvals)
        prov.update({k: "recipe" for k in rvals})
    known = {f.name for f in fields(ExtractConfig)}
    for k, v in flags.items():
        if k not in known:
            raise TypeError(f"build_config got an unknown option {k!r}")
        if v is not None:
            values[k] = v
            prov[k] = "flag"
    for k, cast in _TUPLE_FIELDS.items():
        if values.get(k) is not None:
            values[k] = tuple(cast(v) for v in values[k])
    if values.get("grid_pinpoints") is not None:
        values["grid_pinpoints"] = parse_pinpoints(values["grid_pinpoints"])
    if values.get("layers") is not None:
        values["layers"] = parse_layers(values["layers"])
    # --scales from a flag replaces --img-sizes from a recipe (and the other way round): they say the same thing
    if prov.get("scales") == "flag" and prov.get("img_sizes") == "recipe":
        values.pop("img_sizes")
        prov.pop("img_sizes")
    if prov.get("img_sizes") == "flag" and prov.get("scales") == "recipe":
        values.pop("scales")
        prov.pop("scales")
    for one, other in (("layer", "layers"), ("layers", "layer")):  # --layer from a flag replaces a recipe's --layers
        if prov.get(one) == "flag" and prov.get(other) == "recipe":
            values.pop(other)
            prov.pop(other)
    return ExtractConfig(input=input, output=output, recipe=recipe, provenance=tuple(sorted(prov.items())), **values)


_DEFAULTS = {f.name: f.default for f in fields(ExtractConfig)}
# the settings every output file carries as attributes (besides its version, weights and the whole config)
FILE_ATTRS = ("model", "layer", "layers", "scales", "img_sizes", "max_split_size", "split_mode", "num_prefix_tokens",
              "output_shape", "merge", "fit", "dtype", "pool", "strategy")
JSON_ATTRS = ("scales", "img_sizes", "layers")  # stored as JSON text ("layers": null without --layers)


@dataclass(frozen=True, kw_only=True)
class Resolved(ExtractConfig):
    """Every option with its default filled in from the backbone (flat: `res.fit`, `res.batch_size`, ...), plus
    what was derived from it; this is what runs, and what is saved with the output (`to_dict`, `file_attrs`)."""

    img_sizes: tuple[int, ...]  # square side per scale, in the order given
    scales: tuple[float, ...]  # as asked (--scales, or the default); with --img-sizes, those over the input size
    max_split_size: int
    fit: str
    output: str
    format: str  # h5 | safetensors
    shard_size: int
    backbone: BackboneCfg
    output_is_dir: bool
    strategy_cfg: StrategyCfg | None = None  # a dynamic-resolution strategy's settings; None for s2
    weights_revision: str | None = None  # the weights pinned for the run (org/name@sha, sha256:...), once located

    @property
    def sampling(self) -> Sampling:
        """How the frames of a video are chosen (inactive: videos are not read)."""
        return Sampling(self.fps, self.num_frames, self.max_frames)

    @property
    def side(self) -> int:
        """Images are fitted once, to the largest scale; the engine derives the smaller ones."""
        return max(self.img_sizes)

    def bytes_per_image(self) -> int:
        """Bytes an image's features take at the square plan (ragged grids vary around it)."""
        bb = self.backbone
        side = self.max_split_size
        gh, gw = bb.feature_hw((side, side))
        n0 = max(1, -(-self.img_sizes[self.resize_output_to_idx] // side))
        tokens = bb.num_prefix_tokens + gh * gw * n0 * n0
        channels = bb.channels * len(self.img_sizes)
        pooled = self.pooled_width(channels) * itemsize(pooled_dtype(self.dtype)) if self.pool != "none" else 0
        tokens, channels = self.stored({"output_grid": [gh * n0, gw * n0], "output_shape": [tokens, channels]})[
            "output_shape"]
        n = self.num_layers  # --layers: L x T rows, one pooled row of L x C
        return (0 if self.pool_only else entry_bytes(tokens * n, channels, self.dtype)) + pooled * n

    @property
    def num_layers(self) -> int:
        """Layers stored per image: those of --layers, else one."""
        return len(self.layers) if self.layers is not None else 1

    def pooled_width(self, channels: int) -> int:
        """The width of the stored pooled vector: the features' channels (before --reduce), or with --pool embed
        the combined embedding and each scale's, (1 + scales) x the model's embedding width."""
        return (1 + len(self.img_sizes)) * int(self.backbone.embed_dim or 0) if self.pool == "embed" else channels

    def stored(self, entry: dict[str, Any]) -> dict[str, Any]:
        """A plan entry's `output_grid` and `output_shape` as they are stored: after --reduce, the grid and shape
        before it kept as `reduced_from`; the entry as it is without a reduction. The one place that shape is made
        (the dry run, the default shard size and the writers' shapes ask it)."""
        r = parse_reduce(self.reduce)
        if r is None:
            return entry
        before = {"output_shape": list(entry["output_shape"]), "output_grid": list(entry["output_grid"])}
        shape = r.shape(before["output_grid"], before["output_shape"][1], self.backbone.num_prefix_tokens)
        return {**entry, "reduced_from": before, "output_grid": list(r.grid(before["output_grid"])),
                "output_shape": list(shape)}

    def to_dict(self) -> dict[str, Any]:
        """The saved config: every option (strategy options inside `strategy`), the backbone and the derived
        values, and where each option's value came from (`set_by`)."""
        d: dict[str, Any] = {name: _plain(getattr(self, name)) for name, o in OPTION_DECLS.items()
                             if o.resume not in (IN_STRATEGY, IN_BACKBONE)}  # those two: inside `strategy`, `backbone`
        d.update(backbone=self.backbone.to_dict(), layer=self.backbone.layer, scales=list(self.scales),
                 num_prefix_tokens=self.backbone.num_prefix_tokens, output_shape=self.backbone.output_shape,
                 merge="concat", set_by=dict(self.provenance))
        d.update(STRATEGIES[self.strategy].saved(self.strategy_cfg))
        for name, o in OPTION_DECLS.items():  # outputs written before these options existed resume
            if o.added and d.get(name) == _DEFAULTS[name]:
                d.pop(name)
        if self.weights_revision is not None:
            d["weights_revision"] = self.weights_revision  # a resumed run must load the same weights
        return d

    def compare_keys(self) -> list[str]:
        """The saved settings a resumed run must share with the run it continues: every option declared COMPARED
        or IN_STRATEGY, and every derived value (the backbone, its shape, the weights' revision) but `set_by`."""
        def compared(k: str) -> bool:
            o = OPTION_DECLS.get(k)
            return k != "set_by" if o is None else o.resume in (COMPARED, IN_STRATEGY)
        return [k for k in self.to_dict() if compared(k)]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def file_attrs(self, weights: str) -> dict[str, Any]:
        """The attributes of every output file: FILE_ATTRS, the version, the weights loaded, the whole config, and
        `source_root`: the folder the run ran in, against which the images' relative sources resolve (export)."""
        d = self.to_dict()
        attrs = {k: json.dumps(d.get(k)) if k in JSON_ATTRS else d[k] for k in FILE_ATTRS if k != "strategy"}
        return {"s2cli_version": __version__, **attrs, "weights": weights, "config": self.to_json(),
                "strategy": self.strategy, "source_root": os.getcwd()}


def _plain(v: Any) -> Any:
    """Tuples as lists, as JSON gives them back."""
    return [_plain(x) for x in v] if isinstance(v, (tuple, list)) else v


def _choice(name: str, value: str) -> None:
    """`value` of the option `name` is one of its declared choices."""
    o = OPTION_DECLS[name]
    if value not in o.allowed:
        raise ConfigError(f"{o.flag} is not known", given=value, expected=" | ".join(o.allowed),
                          fix=f"pass {o.flag} {o.allowed[0]}")


def default_output(input_path: str, model: str) -> str:
    """`<input name>.<model>.h5` in the current directory (model specs made file-name safe)."""
    name = Path(input_path.rstrip("/")).name
    stem = "".join(c if c.isalnum() or c in "-_." else "-" for c in name.split(".")[0] if c not in "{}*?").strip("-")
    stem = stem or "features"
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in model).strip("-")
    return f"{stem}.{safe}.h5"


def resolve_config(cfg: ExtractConfig, backbone: BackboneCfg) -> Resolved:
    """Validate every option (before any weights load) and fill defaults from the backbone."""
    for name in ("split_mode", "precision", "dtype"):
        _choice(name, getattr(cfg, name))
    fit = cfg.fit or backbone.fit
    _choice("fit", fit)
    sizes, split = _sizes(cfg, backbone)
    _check_options(cfg, backbone, len(sizes))
    output, fmt, is_dir = _output(cfg)
    if cfg.retry_failed and not is_dir:
        raise ConfigError("--retry-failed adds the retried images to an output folder as shards of their own; a single "
                          "file cannot take them without being rewritten whole", given=output,
                          fix="rerun with --overwrite (every image is extracted again), or extract into a folder: -o OUTDIR/")
    strategy_fields = tuple(n for n, o in OPTION_DECLS.items() if o.resume == IN_STRATEGY and n != "strategy")
    set_by = dict(cfg.provenance)
    set_fields = tuple(f for f in strategy_fields if getattr(cfg, f) is not None) + tuple(
        f for f in SHAPE_OPTIONS if f in set_by)  # a shape option the strategy does not use is refused, not ignored
    strategy = resolve_strategy(
        StrategyArgs(cfg.strategy, fit=fit, img_sizes=sizes, set_fields=set_fields, set_by=set_by, recipe=cfg.recipe,
                     flags={n: o.flag for n, o in OPTION_DECLS.items()},
                     **{f: getattr(cfg, f) for f in strategy_fields}),
        BackboneFacts(split, backbone.patch_size, backbone.any_size, backbone.name))
    given = {f.name: getattr(cfg, f.name) for f in fields(ExtractConfig)}
    given.update(img_sizes=sizes, scales=_scales(cfg, sizes, backbone), max_split_size=split, fit=fit,
                 output=output, format=fmt, shard_size=cfg.shard_size or 1,
                 layer=backbone.layer if cfg.layers is None else None)
    res = Resolved(**given, backbone=backbone, output_is_dir=is_dir, strategy_cfg=strategy)
    if res.reduce is not None:
        _check_one_grid(res)
    if cfg.shard_size is None:
        per_image = res.bytes_per_image() * (res.sampling.max_count() or 1)  # a video entry holds its frames
        n = min(100_000, SHARD_BYTES // max(1, per_image))
        n = min(n, formats.get(res.format).max_images() or n)  # a format's header limit (safetensors)
        res = dataclasses.replace(res, shard_size=max(1, n))
    return res


def _check_one_grid(res: Resolved) -> None:
    """--reduce works on one token grid per image: the strategy's output of a square image must be one."""
    entry, _ = STRATEGIES[res.strategy].plan_entry(res, (res.side, res.side))
    gh, gw = entry["output_grid"]
    if entry["output_shape"][0] != res.backbone.num_prefix_tokens + gh * gw:
        raise ConfigError(f"--reduce works on one token grid per image; --strategy {res.strategy} writes several maps",
                          given=f"--reduce {res.reduce} --strategy {res.strategy}",
                          expected="a strategy whose output is one map", fix="drop --reduce")


def _sizes(cfg: ExtractConfig, backbone: BackboneCfg) -> tuple[tuple[int, ...], int]:
    """The square side of every scale (--scales times the input size, or --img-sizes) and the tile size."""
    if cfg.scales is not None and cfg.img_sizes is not None:
        raise ConfigError("--scales and --img-sizes were both given", given=(cfg.scales, cfg.img_sizes),
                          fix="pass one: --scales 1,2,3 (times the model's input size) or --img-sizes 336,672,1008")
    if cfg.img_sizes is not None:
        sizes = tuple(cfg.img_sizes)
        bad = [s for s in sizes if s <= 0]
        if bad or not sizes:
            raise ConfigError("--img-sizes must be positive", given=",".join(map(str, sizes)), fix="e.g. --img-sizes 336,672")
    else:
        scales = tuple(cfg.scales) if cfg.scales is not None else DEFAULT_SCALES
        bad = [s for s in scales if not 0 < s < math.inf or int(backbone.input_size * s) <= 0]
        if bad or not scales:
            raise ConfigError("--scales must be positive and finite, each at least one pixel times the model's input "
                              f"size ({backbone.input_size})", given=",".join(map(str, scales)), fix="e.g. --scales 1,2,3")
        sizes = tuple(int(backbone.input_size * s) for s in scales)
    split = cfg.max_split_size or backbone.input_size
    if split <= 0:
        raise ConfigError("--max-split-size must be positive", given=split, fix=f"e.g. --max-split-size {backbone.input_size}")
    if split > max(sizes):
        raise ConfigError("--max-split-size is larger than the largest scale, so no scale would be split into tiles",
                          given=f"{split} > {max(sizes)}", expected=f"a tile size <= {max(sizes)} (the model's input "
                          f"size is {backbone.input_size})", fix="drop --max-split-size, or raise the scales")
    return sizes, split


def _scales(cfg: ExtractConfig, sizes: tuple[int, ...], backbone: BackboneCfg) -> tuple[float, ...]:
    """The scales as the user asked for them (--scales 0.7,1.3 stays [0.7, 1.3], beside the sizes it makes), or the
    sizes over the model's input size where --img-sizes was given."""
    if cfg.img_sizes is not None:
        return tuple(s / backbone.input_size for s in sizes)
    return tuple(float(s) for s in (cfg.scales if cfg.scales is not None else DEFAULT_SCALES))


def _check_options(cfg: ExtractConfig, backbone: BackboneCfg, n: int) -> None:
    """Every option that is checked on its own or against the backbone (`n`: the number of scales)."""
    if not -n <= cfg.resize_output_to_idx < n:
        raise ConfigError("--resize-output-to-idx is out of range", given=cfg.resize_output_to_idx,
                          expected=f"{-n}..{n - 1} for {n} scales", fix="use 0 (first scale's grid) or -1 (last)")
    if backbone.output_shape == "bchw" and backbone.num_prefix_tokens:
        raise ConfigError("a bchw backbone cannot keep prefix tokens", given=backbone.num_prefix_tokens,
                          fix="drop --keep-cls")
    _check_numbers(cfg)
    if cfg.random_init and cfg.weights:
        raise ConfigError("--random-init and --weights contradict each other", fix="drop one of them")
    for name in ("pool", "on_error", "input_format", "decode"):
        _choice(name, getattr(cfg, name))
    record = STRATEGIES.get(cfg.strategy)
    if cfg.decode == "torch" and record is not None and not record.device_decode:
        raise ConfigError("--decode torch decodes and fits for the S² engine only; the strategies render their views "
                          "with Pillow in the decode workers", given=f"--decode torch --strategy {cfg.strategy}",
                          expected="--decode pil with --strategy", fix="drop --decode torch (or --strategy)")
    if cfg.pool == "cls" and backbone.num_prefix_tokens == 0:
        raise ConfigError("--pool cls needs a prefix token, and this model keeps none", given=cfg.model,
                          fix="use --pool mean, or --keep-cls for CLIP")
    if cfg.pool == "embed" and (record is None or not record.embeds or backbone.embed_dim is None):
        raise ConfigError("--pool embed needs a model with a projection head into an image-text space (CLIP, SigLIP, "
                          "open_clip) and the S² engine", given=f"{cfg.model} --strategy {cfg.strategy}",
                          fix="use --pool mean, or a CLIP/SigLIP/open_clip model without --strategy")
    if cfg.pool_only and cfg.pool == "none":
        raise ConfigError("--pool-only needs --pool mean or cls", fix="add --pool mean")
    if cfg.pool_only and cfg.dtype in QUANTIZED:
        raise ConfigError(f"--dtype {cfg.dtype} stores token features as codes with scales; pooled vectors are kept in "
                          f"{pooled_dtype(cfg.dtype)}, and --pool-only stores nothing else",
                          given=f"--dtype {cfg.dtype} --pool-only", fix=f"pass --dtype {pooled_dtype(cfg.dtype)}, or drop --pool-only")
    if parse_reduce(cfg.reduce) is not None and cfg.reduce.startswith("s2c") and backbone.num_prefix_tokens:
        raise ConfigError("--reduce s2c:K merges neighbours on channels, which prefix tokens do not have",
                          given=f"--reduce {cfg.reduce} with {backbone.num_prefix_tokens} prefix token(s)",
                          fix="drop --keep-cls, or use --reduce avg:K | budget:N (prefix tokens kept apart)")
    sampling = Sampling(cfg.fps, cfg.num_frames, cfg.max_frames)
    sampling.check()
    if cfg.frames_as_images and not sampling.active:
        raise ConfigError("--frames-as-images stores a video's chosen frames, and no frame sampling was given",
                          expected="--num-frames N, --fps F or --max-frames M with it", fix="add e.g. --num-frames 8")
    if sampling.active and not cfg.frames_as_images and cfg.pool != "none":
        raise ConfigError("--pool stores one vector per entry, and a video's entry holds all its frames",
                          given=f"--pool {cfg.pool} with frame sampling", expected="--frames-as-images with --pool",
                          fix="add --frames-as-images (one entry, and one pooled vector, per frame), or drop --pool")


def _check_numbers(cfg: ExtractConfig) -> None:
    """Every numeric option in its range, before anything runs (a value out of range is never clamped)."""
    for name in ("batch_size", "max_tiles_per_call", "limit", "shard_size", "num_samples", "prefetch_factor"):
        v = getattr(cfg, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, Integral) or v <= 0):
            raise ConfigError(f"{flag(name)} must be a positive integer", given=v, fix=(
                "drop it to estimate the total" if name == "num_samples" else f"pass {flag(name)} 1 or more"))
    for name, fix in (("workers", "pass -j 0 to decode in the main process"), ("max_failures", "e.g. 100"),
                      ("retries", "e.g. 3")):
        v = getattr(cfg, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, Integral) or v < 0):
            raise ConfigError(f"{flag(name)} must be an integer >= 0", given=v, fix=fix)
    if cfg.prefetch_factor is not None and cfg.workers == 0:  # as torch's DataLoader refuses it
        raise ConfigError(f"{flag('prefetch_factor')} sets how far decode workers work ahead, and -j 0 starts none",
                          given=f"-j 0 {flag('prefetch_factor')} {cfg.prefetch_factor}",
                          fix=f"drop {flag('prefetch_factor')}, or pass -j 1 or more")
    t = cfg.decode_timeout
    if isinstance(t, bool) or not isinstance(t, Real) or not 0 < t < math.inf:
        raise ConfigError(f"{flag('decode_timeout')} must be a positive number of seconds (every image would fail at "
                          "it)", given=t, fix=f"pass e.g. {flag('decode_timeout')} 120")


def _output(cfg: ExtractConfig) -> tuple[str, str, bool]:
    """(the output path, its format, whether it is a folder of shards)."""
    output = cfg.output or default_output(cfg.input, cfg.model)
    output = str(local_of(output) or output)  # file://PATH is that local path
    fmt = formats.of_path(output)
    suffix_fmt = fmt.name if fmt is not None else None
    if local_of(output) is None:  # remote storage: its file system must be installed; a folder of shards only
        check_url(output)
        if suffix_fmt is not None:
            raise ConfigError("a single output file on remote storage is not supported (it could not be claimed, "
                              "resumed or replaced safely there)", given=output,
                              fix=f"pass a folder URL (-o {output.rsplit('/', 1)[0]}/features/) for resumable "
                                  "shards, or a local file and copy it up when the run ends")
    if suffix_fmt is not None and output.endswith(("/", os.sep)):
        raise ConfigError("-o ends in a slash (a folder) and in a file suffix (one file): which one is meant is not "
                          "clear", given=output, fix=f"pass -o {output.rstrip('/' + os.sep)} for one file, or -o "
                          f"{output.rstrip('/' + os.sep).rsplit('.', 1)[0]}/ for a folder of shards")
    if cfg.format is not None:
        _choice("format", cfg.format)
        if suffix_fmt is not None and suffix_fmt != cfg.format:
            raise ConfigError("--format contradicts the output file's suffix", given=(cfg.format, output),
                              fix=f"name the file *{formats.get(cfg.format).suffix} or drop --format")
    name = cfg.format or suffix_fmt or "h5"
    if local_of(output) is None and not formats.get(name).remote:
        raise ConfigError(f"--format {name} writes each shard as a folder, which is written to local folders only",
                          given=output, fix="pass a local -o OUTDIR/, or another --format")
    return output, name, suffix_fmt is None


def resolve_options(input: str, output: str | None = None, recipe: str | None = None, **options: Any) -> Resolved:
    """defaults < recipe < options, checked and resolved against the model's config (no weights load): the one
    way a run's settings are made, for `s2cli.extract`, the CLI's commands and the benchmarks."""
    cfg = build_config(input, output, recipe, **options)
    return resolve_config(cfg, resolve_backbone(cfg))


def resolve_backbone(cfg: ExtractConfig) -> BackboneCfg:
    """The backbone `cfg` asks for, described at its --layer; with --layers, each layer described (its index
    checked against the model) and the one the forward runs deepest to kept (the FLOPs are counted to it)."""
    if cfg.layers is None:
        return resolve(cfg.model, layer=cfg.layer, keep_cls=cfg.keep_cls)
    if cfg.layer is not None:
        raise ConfigError("--layer and --layers were both given", given=(cfg.layer, ",".join(map(str, cfg.layers))),
                          fix="pass one: --layer -2 (one layer), or --layers -2,-1 (several)")
    if cfg.pool == "embed":
        raise ConfigError("--pool embed stores the model's image embedding, one per image whatever the layer; "
                          "--layers stores a pooled vector per layer", given=f"--pool embed --layers "
                          f"{','.join(map(str, cfg.layers))}", fix="use --pool mean|cls with --layers, or extract the "
                          "embeddings in a run of their own")
    described = [resolve(cfg.model, layer=n, keep_cls=cfg.keep_cls) for n in cfg.layers]
    first = described[0]
    if first.output_shape != "bnc":
        raise ConfigError("--layers needs a backbone whose layers all give the same token grid (a ViT); a ConvNet's "
                          "stages differ in size and channels", given=f"--model {cfg.model} --layers "
                          f"{','.join(map(str, cfg.layers))}", fix="extract one stage per run with --layer")
    for b, n in zip(described, cfg.layers):
        if (b.channels, b.num_prefix_tokens, b.drops_cls) != (first.channels, first.num_prefix_tokens, first.drops_cls):
            raise ConfigError("the layers of --layers differ in shape", given=f"layer {n}: {b.channels} channels, "
                              f"layer {cfg.layers[0]}: {first.channels}", fix="list layers of one width")
    return max(described, key=lambda b: (b.layer == -1, b.flops_per_tile() or 0.0))  # the first of the deepest
