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
from .reduce import parse as parse_reduce
from .sources import DECODES, FITS, INPUT_FORMATS
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
POOLS = ("none", "mean", "cls")
ON_ERROR = ("skip", "stop")
SHARD_BYTES = 1 << 30  # default shard size aims at ~1 GiB files
DEFAULT_SCALES = (1.0, 2.0)  # times the model's input size, when neither --scales nor --img-sizes is given
# an option that only decides how fast a run goes or when it stops, not what it writes: a resumed run may change it
RUN_ONLY = {"run_only": True}


@dataclass(frozen=True)
class ExtractConfig:
    """What the user asked for. None means "not set": the model's default applies."""

    input: str
    output: str | None = None
    model: str = "efficientnet-lite0"
    weights: str | None = None
    random_init: bool = False
    seed: int = 0
    layer: int | None = None
    keep_cls: bool = False
    scales: tuple[float, ...] | None = None
    img_sizes: tuple[int, ...] | None = None
    max_split_size: int | None = None
    split_mode: str = "resize"
    resize_output_to_idx: int = 0
    fit: str | None = None
    antialias: bool = False
    batch_size: int = field(default=8, metadata=RUN_ONLY)
    workers: int = field(default=2, metadata=RUN_ONLY)
    max_tiles_per_call: int | None = field(default=None, metadata=RUN_ONLY)
    device: str = field(default="auto", metadata=RUN_ONLY)
    precision: str = "fp32"
    dtype: str = "float32"
    limit: int | None = None
    input_format: str = "auto"
    image_key: str | None = None
    meta_columns: str = "all"  # a list's extra columns kept as each image's metadata: all | none | col,col
    keep_ext: bool = False  # keys keep the file's extension (folders, lists)
    fps: float | None = None  # video: frames at this rate, by presentation timestamps (video.choose)
    num_frames: int | None = None  # video: N frames uniformly over the clip (numpy.linspace, LLaVA-OneVision)
    max_frames: int | None = None  # video: at most M frames (uniform subsampling of the chosen ones)
    frames_as_images: bool = False  # video: each frame stored as its own entry `key#000123` instead of one (F, T, C)
    format: str | None = None  # a registered format (formats.names()); from -o's suffix when it names a file
    shard_size: int | None = None
    pool: str = "none"
    pool_only: bool = False
    on_error: str = field(default="skip", metadata=RUN_ONLY)
    max_failures: int | None = field(default=None, metadata=RUN_ONLY)
    decode_timeout: float = field(default=120.0, metadata=RUN_ONLY)
    check_finite: bool = field(default=True, metadata=RUN_ONLY)
    retries: int = field(default=0, metadata=RUN_ONLY)  # a read failing with an OSError is tried again N times
    retry_failed: bool = field(default=False, metadata=RUN_ONLY)  # redo only the images OUTDIR/ records as failed
    num_samples: int | None = field(default=None, metadata=RUN_ONLY)  # WebDataset: samples in all shards (progress)
    compile: bool = field(default=False, metadata=RUN_ONLY)  # torch.compile the backbone (dynamic=False); changes speed, not what is written
    channels_last: bool | None = field(default=None, metadata=RUN_ONLY)  # NHWC weights and inputs; None: on for bchw backbones (speed only)
    reduce: str | None = None  # token reduction at write time: avg:K | s2c:K | budget:N (reduce.py)
    decode: str = "pil"  # pil: Pillow in the decode workers | torch: torchvision on the run's device (S² only)
    recipe: str | None = None
    # dynamic-resolution strategies (strategies.py); None = the strategy's own default
    strategy: str = "s2"
    min_tiles: int | None = None
    max_tiles: int | None = None
    thumbnail: bool | None = None
    grid_pinpoints: tuple[tuple[int, int], ...] | None = None  # (h, w) each
    anyres_max: int | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    provenance: tuple[tuple[str, str], ...] = ()  # (field, "recipe" | "flag") for every value not a default

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
    # --scales from a flag replaces --img-sizes from a recipe (and the other way round): they say the same thing
    if prov.get("scales") == "flag" and prov.get("img_sizes") == "recipe":
        values.pop("img_sizes")
        prov.pop("img_sizes")
    if prov.get("img_sizes") == "flag" and prov.get("scales") == "recipe":
        values.pop("scales")
        prov.pop("scales")
    return ExtractConfig(input=input, output=output, recipe=recipe, provenance=tuple(sorted(prov.items())), **values)


# what a saved config holds besides the options: derived values, and options whose value lives elsewhere there
_NOT_SAVED = ("keep_cls", "provenance", "min_tiles", "max_tiles", "thumbnail", "grid_pinpoints", "anyres_max",
              "min_pixels", "max_pixels")
# options added after outputs were first written: saved only when set otherwise, so those outputs still resume
_SAVED_UNLESS_DEFAULT = {"decode": "pil", "reduce": None, "meta_columns": "all", "keep_ext": False, "retries": 0,
                         "retry_failed": False, "num_samples": None, "fps": None, "num_frames": None,
                         "max_frames": None, "frames_as_images": False}
# the settings every output file carries as attributes (besides its version, weights and the whole config)
FILE_ATTRS = ("model", "layer", "scales", "img_sizes", "max_split_size", "split_mode", "num_prefix_tokens",
              "output_shape", "merge", "fit", "dtype", "pool", "strategy")
JSON_ATTRS = ("scales", "img_sizes")  # stored as JSON text


@dataclass(frozen=True, kw_only=True)
class Resolved(ExtractConfig):
    """Every option with its default filled in from the backbone (flat: `res.fit`, `res.batch_size`, ...), plus
    what was derived from it; this is what runs, and what is saved with the output (`to_dict`, `file_attrs`)."""

    img_sizes: tuple[int, ...]  # square side per scale, in the order given
    scales: tuple[float, ...]  # img_sizes over the backbone's input size
    max_split_size: int
    fit: str
    output: str
    format: str  # a registered format (formats.names())
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
        pooled = channels * itemsize(pooled_dtype(self.dtype)) if self.pool != "none" else 0
        r = parse_reduce(self.reduce)
        if r is not None:
            tokens, channels = r.shape((gh * n0, gw * n0), channels, bb.num_prefix_tokens)
        return (0 if self.pool_only else entry_bytes(tokens, channels, self.dtype)) + pooled

    def to_dict(self) -> dict[str, Any]:
        """The saved config: every option (strategy options inside `strategy`), the backbone and the derived
        values, and where each option's value came from (`set_by`)."""
        d: dict[str, Any] = {f.name: _plain(getattr(self, f.name)) for f in fields(ExtractConfig) if f.name not in _NOT_SAVED}
        d.update(backbone=self.backbone.to_dict(), layer=self.backbone.layer, scales=list(self.scales),
                 num_prefix_tokens=self.backbone.num_prefix_tokens, output_shape=self.backbone.output_shape,
                 merge="concat", set_by=dict(self.provenance))
        d.pop("strategy")
        d.update(STRATEGIES[self.strategy].saved(self.strategy_cfg))
        for name, default in _SAVED_UNLESS_DEFAULT.items():  # outputs written before these options existed resume
            if d.get(name) == default:
                d.pop(name)
        if self.weights_revision is not None:
            d["weights_revision"] = self.weights_revision  # a resumed run must load the same weights
        return d

    def compare_keys(self) -> list[str]:
        """The saved settings a resumed run must share with the run it continues."""
        run_only = {f.name for f in fields(ExtractConfig) if f.metadata.get("run_only")}
        return [k for k in self.to_dict() if k not in run_only | {"output", "set_by", "recipe", "input"}]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def file_attrs(self, weights: str) -> dict[str, Any]:
        """The attributes of every output file: FILE_ATTRS, the version, the weights loaded, the whole config."""
        d = self.to_dict()
        attrs = {k: json.dumps(d[k]) if k in JSON_ATTRS else d[k] for k in FILE_ATTRS if k != "strategy"}
        return {"s2cli_version": __version__, **attrs, "weights": weights, "config": self.to_json(),
                "strategy": self.strategy}


def _plain(v: Any) -> Any:
    """Tuples as lists, as JSON gives them back."""
    return [_plain(x) for x in v] if isinstance(v, (tuple, list)) else v


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"--{name} is not known", given=value, expected=" | ".join(choices),
                          fix=f"pass --{name} {choices[0]}")


def default_output(input_path: str, model: str) -> str:
    """`<input name>.<model>.h5` in the current directory (model specs made file-name safe)."""
    name = Path(input_path.rstrip("/")).name
    stem = "".join(c if c.isalnum() or c in "-_." else "-" for c in name.split(".")[0] if c not in "{}*?").strip("-")
    stem = stem or "features"
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in model).strip("-")
    return f"{stem}.{safe}.h5"


def resolve_config(cfg: ExtractConfig, backbone: BackboneCfg) -> Resolved:
    """Validate every option (before any weights load) and fill defaults from the backbone."""
    _choice("split-mode", cfg.split_mode, SPLIT_MODES)
    _choice("precision", cfg.precision, PRECISIONS)
    _choice("dtype", cfg.dtype, DTYPES)
    fit = cfg.fit or backbone.fit
    _choice("fit", fit, FITS)
    sizes, split = _sizes(cfg, backbone)
    _check_options(cfg, backbone, len(sizes))
    output, fmt, is_dir = _output(cfg)
    if cfg.retry_failed and not is_dir:
        raise ConfigError("--retry-failed adds the retried images to an output folder as shards of their own; a single "
                          "file cannot take them without being rewritten whole", given=output,
                          fix="rerun with --overwrite (every image is extracted again), or extract into a folder: -o OUTDIR/")
    strategy_fields = ("min_tiles", "max_tiles", "thumbnail", "grid_pinpoints", "anyres_max", "min_pixels", "max_pixels")
    set_by = dict(cfg.provenance)
    set_fields = tuple(f for f in strategy_fields if getattr(cfg, f) is not None) + tuple(
        f for f in SHAPE_OPTIONS if f in set_by)  # a shape option the strategy does not use is refused, not ignored
    strategy = resolve_strategy(
        StrategyArgs(cfg.strategy, fit=fit, img_sizes=sizes, set_fields=set_fields, set_by=set_by, recipe=cfg.recipe,
                     **{f: getattr(cfg, f) for f in strategy_fields}),
        BackboneFacts(split, backbone.patch_size, backbone.family, backbone.model_type, backbone.output_shape))
    given = {f.name: getattr(cfg, f.name) for f in fields(ExtractConfig)}
    given.update(img_sizes=sizes, scales=tuple(s / backbone.input_size for s in sizes), max_split_size=split, fit=fit,
                 output=output, format=fmt, shard_size=cfg.shard_size or 1, layer=backbone.layer)
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
    _choice("pool", cfg.pool, POOLS)
    _choice("on-error", cfg.on_error, ON_ERROR)
    _choice("input-format", cfg.input_format, INPUT_FORMATS)
    _choice("decode", cfg.decode, DECODES)
    record = STRATEGIES.get(cfg.strategy)
    if cfg.decode == "torch" and record is not None and not record.device_decode:
        raise ConfigError("--decode torch decodes and fits for the S² engine only; the strategies render their views "
                          "with Pillow in the decode workers", given=f"--decode torch --strategy {cfg.strategy}",
                          expected="--decode pil with --strategy", fix="drop --decode torch (or --strategy)")
    if cfg.pool == "cls" and backbone.num_prefix_tokens == 0:
        raise ConfigError("--pool cls needs a prefix token, and this model keeps none", given=cfg.model,
                          fix="use --pool mean, or --keep-cls for CLIP")
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
    for name, v in (("batch-size", cfg.batch_size), ("max-tiles-per-call", cfg.max_tiles_per_call), ("limit", cfg.limit),
                    ("shard-size", cfg.shard_size)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, Integral) or v <= 0):
            raise ConfigError(f"--{name} must be a positive integer", given=v, fix=f"pass --{name} 1 or more")
    if isinstance(cfg.workers, bool) or not isinstance(cfg.workers, Integral) or cfg.workers < 0:
        raise ConfigError("-j/--workers must be an integer >= 0", given=cfg.workers,
                          fix="pass -j 0 to decode in the main process")
    t = cfg.decode_timeout
    if isinstance(t, bool) or not isinstance(t, Real) or not 0 < t < math.inf:
        raise ConfigError("--decode-timeout must be a positive number of seconds (every image would fail at it)",
                          given=t, fix="pass e.g. --decode-timeout 120")
    if cfg.max_failures is not None and (not isinstance(cfg.max_failures, Integral) or cfg.max_failures < 0):
        raise ConfigError("--max-failures must be an integer >= 0", given=cfg.max_failures, fix="e.g. --max-failures 100")
    if isinstance(cfg.retries, bool) or not isinstance(cfg.retries, Integral) or cfg.retries < 0:
        raise ConfigError("--retries must be an integer >= 0", given=cfg.retries, fix="e.g. --retries 3")
    if cfg.num_samples is not None and (not isinstance(cfg.num_samples, Integral) or cfg.num_samples < 1):
        raise ConfigError("--num-samples must be a positive integer", given=cfg.num_samples,
                          fix="drop it to estimate the total")


def _output(cfg: ExtractConfig) -> tuple[str, str, bool]:
    """(the output path, its format, whether it is a folder of shards)."""
    output = cfg.output or default_output(cfg.input, cfg.model)
    output = str(local_of(output) or output)  # file://PATH is that local path
    fmt = formats.of_path(output)
    suffix_fmt = fmt.name if fmt is not None and not output.endswith(("/", os.sep)) else None
    if fmt is not None and output.endswith(("/", os.sep)):
        raise ConfigError("-o ends in a slash (a folder) and in a file suffix (one file): which one is meant is not "
                          "clear", given=output, fix=f"pass -o {output.rstrip('/' + os.sep)} for one file, or -o "
                          f"{output.rstrip('/' + os.sep).rsplit('.', 1)[0]}/ for a folder of shards")
    if local_of(output) is None:  # remote storage: its file system must be installed; a folder of shards only
        check_url(output)
        if suffix_fmt is not None:
            raise ConfigError("a single output file on remote storage is not supported (it could not be claimed, "
                              "resumed or replaced safely there)", given=output,
                              fix=f"pass a folder URL (-o {output.rsplit('/', 1)[0]}/features/) for resumable "
                                  "shards, or a local file and copy it up when the run ends")
    if cfg.format is not None:
        _choice("format", cfg.format, formats.names())
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
    return resolve_config(cfg, resolve(cfg.model, layer=cfg.layer, keep_cls=cfg.keep_cls))
