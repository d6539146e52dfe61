"""Probe: which scales, layer or strategy pay off on labelled data, answered on a bounded sample before a full
extraction. `probe` extracts the same stratified sample once per variant through `extract`, reads the stored
features back through the readers, and scores each with a standardized logistic-regression probe and k-NN under
stratified k-fold cross-validation (scikit-learn); or it scores outputs that already exist."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import formats
from .config import INPUT, OPTION_DECLS, ExtractConfig, Resolved
from .dtypes import entry_bytes, itemsize, pooled_dtype
from .errors import ConfigError
from .inputs.samples import Sample, sample_meta
from .inputs.units import Input, Unit
from .outdir import OutputDir
from .plan import dry_run
from .readers import Reader, open_features
from .store import filesystem, local_of

VECTORS = ("auto", "mean", "pooled")  # auto: the mean of the stored tokens, or the pooled vector where only it is stored
NOT_OPTIONS = ("input", "output", "provenance")
EXTRA_FIX = "pip install 's2-features[probe]'"


@dataclass(frozen=True)
class Variant:
    """One `--try`: its text as given (the variant's name) and the extraction options it sets."""

    name: str
    options: dict[str, Any]


@dataclass
class VariantResult:
    """One variant's scores over the folds and its costs per image (None where not known: outputs that exist
    have no plan or speed)."""

    name: str
    options: dict[str, Any]
    source: str  # the features scored: the variant's output, or the existing output given
    dim: int
    probe_accuracy: list[float]  # per fold
    knn_accuracy: list[float]
    bytes_per_image: float  # the stored arrays (tokens and pooled vector) in their stored dtype
    tiles_per_image: float | None = None  # from the dry-run plan
    flops_per_image: float | None = None
    images_per_s: float | None = None  # the variant's extraction run

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in ("probe_accuracy", "knn_accuracy"):
            d[f"{name}_mean"], d[f"{name}_std"] = float(np.mean(d[name])), float(np.std(d[name]))
        return d


@dataclass
class ProbeReport:
    """What `probe` found: one result per variant, on the same images and folds."""

    variants: list[VariantResult]
    keys: list[str]  # the sampled images, in input order
    labels: list[str]
    folds: int
    k: int
    seed: int
    vector: str
    dropped: list[str] = field(default_factory=list)  # sampled images that failed in some variant, left out of all

    @property
    def classes(self) -> dict[str, int]:
        names, counts = np.unique(np.array(self.labels, dtype=str), return_counts=True)
        return {str(n): int(c) for n, c in zip(names, counts)}

    def to_dict(self) -> dict[str, Any]:
        return {"num_images": len(self.keys), "classes": self.classes, "folds": self.folds, "k": self.k,
                "seed": self.seed, "vector": self.vector, "dropped": self.dropped,
                "variants": [v.to_dict() for v in self.variants], "keys": self.keys, "labels": self.labels}


# ---- variants -------------------------------------------------------------------------------------------------
def option_types() -> dict[str, Any]:
    """Every extraction option a variant can set (those ExtractConfig declares, but the input and the output), by
    name, with its field's type."""
    hints = typing.get_type_hints(ExtractConfig)
    return {name: hints[name] for name, decl in OPTION_DECLS.items() if decl.flags and name not in NOT_OPTIONS}


def parse_try(text: str) -> Variant:
    """'scales=1,2;layer=-2' -> the options it sets, each checked against the extraction options and converted to
    its type (a list for tuples, true/false for flags, none for "not set")."""
    types_ = option_types()
    options: dict[str, Any] = {}
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        name, eq, value = part.partition("=")
        name = name.strip().lstrip("-").replace("-", "_")
        if not eq:
            raise ConfigError("a --try part is not name=value", given=part, expected="e.g. --try 'scales=1,2;layer=-2'",
                              fix="join options with ';', each as name=value")
        if name not in types_:
            raise ConfigError(f"--try sets an unknown option {name!r}", given=text,
                              expected="extract options: " + ", ".join(n.replace("_", "-") for n in sorted(types_)),
                              fix="name options as `s2 extract --help` lists them, e.g. scales=1,2 or max-split-size=448")
        if OPTION_DECLS[name].panel == INPUT:  # which images are read, and as what: the same for every variant
            raise ConfigError(f"--try cannot change {name}: an input option decides which images are read, and "
                              "every variant sees the same images", given=text, fix=f"give {name} once, outside --try")
        options[name] = _convert(name, value.strip(), types_[name])
    if not options:
        raise ConfigError("--try sets nothing", given=text, fix="e.g. --try 'scales=1,2'")
    return Variant(text, options)


def _convert(name: str, text: str, typ: Any) -> Any:
    """A --try value as its option's type."""
    args = typing.get_args(typ)
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        if type(None) in args and text.lower() in ("none", "null", ""):
            return None
        typ = next(a for a in args if a is not type(None))
        args = typing.get_args(typ)
    try:
        if typ is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes", "on")
        if typ in (int, float, str):
            return typ(text)
        if typing.get_origin(typ) is tuple and args and args[0] in (int, float):
            return tuple(args[0](v) for v in text.split(",") if v.strip())
        return text  # a structured option (grid pinpoints): the config parses its text
    except ValueError:
        raise ConfigError(f"--try gives {name} a value of the wrong type", given=f"{name}={text}",
                          expected=getattr(typ, "__name__", str(typ)), fix=f"e.g. {name}=" + (
                              "1,2" if typing.get_origin(typ) is tuple else "true" if typ is bool else "1")) from None


# ---- labels and the sample ------------------------------------------------------------------------------------
def read_labels(path: str) -> dict[str, str]:
    """A key,label CSV (a header row naming both)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:  # a byte-order mark (a spreadsheet's export) skipped
            rows = list(csv.DictReader(fh))
    except OSError as e:
        raise ConfigError(f"cannot read --labels ({e.strerror})", given=path, fix="pass a key,label CSV file") from None
    if not rows or not {"key", "label"} <= set(rows[0]):
        raise ConfigError("--labels needs a header row with `key` and `label` columns", given=path,
                          expected="key,label then one row per image", fix="add the header key,label")
    return {r["key"]: r["label"] for r in rows if r["label"] not in (None, "")}


def label_of(key: str, meta: dict[str, Any] | None, table: dict[str, str] | None, column: str | None) -> str | None:
    """An image's label: from the --labels table, else its metadata field `column` (a list's column, or a field
    of its json sidecar/member), else the first folder of its key (a folder of class subfolders); None if none."""
    if table is not None:
        return table.get(key)
    if column is not None:
        meta = meta or {}
        v = meta.get(column, (meta.get("json") or {}).get(column) if isinstance(meta.get("json"), dict) else None)
        return None if v is None or v == "" else str(v)
    head, sep, _ = key.partition("/")
    return head if sep else None


def check_labels(keys: list[str], labels: list[str | None], how: str) -> list[str]:
    """Every key has a label, and there are at least two classes."""
    missing = [k for k, lab in zip(keys, labels) if lab is None]
    if missing:
        raise ConfigError(f"{len(missing)} of {len(keys)} images have no label ({how})", given=missing[:3],
                          expected="a label for every image",
                          fix="add them, or pass --labels key,label.csv / --label-column NAME")
    found = sorted(set(labels))  # type: ignore[arg-type]
    if len(found) < 2:
        raise ConfigError("the data has one class, and a probe tells classes apart", given=found,
                          expected="images of at least two labels", fix="add images of another class")
    return labels  # type: ignore[return-value]


def stratified(labels: list[str], limit: int | None, seed: int) -> list[int]:
    """The indices of a sample of at most `limit` images with the classes in proportion (all of them without a
    limit), in input order; the same for the same labels, limit and seed."""
    if not limit or limit >= len(labels):
        return list(range(len(labels)))
    from sklearn.model_selection import train_test_split

    n_classes = len(set(labels))
    if limit < n_classes:
        raise ConfigError("--limit is smaller than the number of classes", given=limit,
                          expected=f"at least {n_classes}", fix="raise --limit")
    chosen, _ = train_test_split(np.arange(len(labels)), train_size=limit, stratify=labels, random_state=seed)
    return sorted(int(i) for i in chosen)


def check_folds(labels: list[str], folds: int) -> None:
    """Every class has at least `folds` images (each fold tests every class)."""
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ConfigError("--folds must be an integer of at least 2", given=folds, fix="pass --folds 5")
    counts = {c: labels.count(c) for c in sorted(set(labels))}
    few = {c: n for c, n in counts.items() if n < folds}
    if few:
        raise ConfigError(f"fewer images per class than folds ({folds})", given=few,
                          expected=f"at least {folds} images of every class in the sample",
                          fix="raise --limit, add images, or lower --folds")


# ---- scoring --------------------------------------------------------------------------------------------------
def pipelines(k: int) -> tuple[Any, Any]:
    """The linear probe (standardized features, L2 logistic regression, lbfgs) and k-NN (L2-normalized features:
    cosine neighbours, majority vote)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler

    return (make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)),
            make_pipeline(Normalizer(), KNeighborsClassifier(n_neighbors=k)))


def score(x: np.ndarray, labels: list[str], folds: int, k: int, seed: int) -> tuple[list[float], list[float]]:
    """Accuracy per fold of the linear probe and of k-NN (k at most the smallest training fold) under
    StratifiedKFold(folds, shuffle, seed)."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    k = min(k, len(labels) - math.ceil(len(labels) / folds))
    linear, knn = pipelines(k)
    y = np.array(labels, dtype=str)
    return ([float(a) for a in cross_val_score(linear, x, y, cv=cv)],
            [float(a) for a in cross_val_score(knn, x, y, cv=cv)])


def vectors(ff: Reader, keys: list[str], vector: str) -> tuple[np.ndarray, float]:
    """One vector per key (`mean`: of the stored tokens past the prefix tokens, a video's over all its frames;
    `pooled`: the stored pooled vector; `auto`: mean where tokens are stored) and the stored bytes per image."""
    how = ("mean" if ff.feature_shape is not None else "pooled") if vector == "auto" else vector
    item = itemsize(pooled_dtype(ff.dtype))  # a pooled vector's element (int8/float8 features: float16 vectors)
    pooled = str(ff.attrs.get("pool") or "none") != "none"
    if (how == "mean" and ff.feature_shape is None) or (how == "pooled" and not pooled):
        raise ConfigError(f"--vector {how} needs {'token features' if how == 'mean' else 'pooled vectors'}, and "
                          f"{ff.path} holds none", given=vector, fix="pass --vector auto")
    rows, nbytes = [], 0
    for key in keys:
        p = ff.pooled(key) if pooled or how == "pooled" else None
        x = ff[key] if ff.feature_shape is not None else None
        if how == "mean":
            prefix = int(ff.meta(key)["num_prefix_tokens"])
            rows.append(np.asarray(x, np.float32)[..., prefix:, :].reshape(-1, x.shape[-1]).mean(0))
        else:
            rows.append(np.asarray(p, np.float32))
        rows_, width = (x.size // x.shape[-1], x.shape[-1]) if x is not None else (0, 0)
        nbytes += entry_bytes(rows_, width, ff.dtype) + (p.size * item if pooled else 0)
    return np.stack(rows), nbytes / max(1, len(keys))


# ---- the probe ------------------------------------------------------------------------------------------------
def is_output(path: str) -> bool:
    """Features written by `s2 extract`: a .h5/.safetensors file, or an output folder (its run.json), local or on
    remote storage (s3://...: read through the readers as a local one is)."""
    local = local_of(path)
    if local is None:
        fmt = formats.of_path(Path(path.rstrip("/")))
        if fmt is not None and not path.endswith("/"):
            fs, inner = filesystem(path)
            return bool(fs.isdir(inner) if fmt.store == formats.DIR else fs.isfile(inner))
        return OutputDir(path).has_run
    p = Path(local)
    fmt = formats.of_path(p)
    return fmt.exists(p) if fmt is not None else (p.is_dir() and OutputDir(p).run_file.is_file())


@dataclass(frozen=True)
class Protocol:
    """How images are labelled, sampled and scored: the same for every variant (and every output) of a probe."""

    table: dict[str, str] | None = None  # --labels: key -> label
    column: str | None = None  # --label-column
    limit: int | None = None
    folds: int = 5
    k: int = 5
    seed: int = 0
    vector: str = "auto"

    @property
    def how(self) -> str:
        """Where the labels come from, as errors say it."""
        return "--labels" if self.table is not None else f"--label-column {self.column}" if self.column else \
            "class subfolders"

    def label(self, key: str, meta: dict[str, Any] | None) -> str | None:
        return label_of(key, meta, self.table, self.column)

    def sample(self, keys: list[str], labels: list[str | None]) -> tuple[list[str], list[str]]:
        """The stratified sample's keys and labels, checked: labels for all, two classes, a fold's worth of each."""
        labs = check_labels(keys, labels, self.how)
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1):
            raise ConfigError("--limit must be a positive integer", given=self.limit, fix="pass e.g. --limit 500")
        chosen = stratified(labs, self.limit, self.seed)
        keys, labs = [keys[i] for i in chosen], [labs[i] for i in chosen]
        check_folds(labs, self.folds)
        return keys, labs

    def result(self, ff: Reader, keys: list[str], labels: list[str], name: str, options: dict[str, Any],
               **costs: Any) -> VariantResult:
        """One reader's features of `keys`, scored."""
        x, nbytes = vectors(ff, keys, self.vector)
        probe_acc, knn_acc = score(x, labels, self.folds, self.k, self.seed)
        return VariantResult(name, options, str(ff.path), x.shape[1], probe_acc, knn_acc, nbytes, **costs)

    def report(self, results: list[VariantResult], keys: list[str], labels: list[str],
               dropped: list[str] | None = None) -> ProbeReport:
        return ProbeReport(results, keys, labels, self.folds, self.k, self.seed, self.vector, dropped or [])


def probe(data: str | Sequence[str], tries: Sequence[str] = (), *, labels: str | None = None,
          label_column: str | None = None, limit: int | None = None, folds: int = 5, k: int = 5, seed: int = 0,
          vector: str = "auto", workdir: str | None = None, recipe: str | None = None, progress: Any = None,
          log: Callable[[str], None] | None = None, **options: Any) -> ProbeReport:
    """Score variants of an extraction on labelled data, before extracting it all.

    `data`: images (a folder of class subfolders, a list or shards; labels from `labels`, a key,label CSV, or from
    each image's metadata field `label_column`, else the first folder of each key) extracted once per variant of
    `tries` ('scales=1,2;layer=-2': any extract options, over `recipe` and `options`), on a sample of at most
    `limit` images stratified by label (`seed`); or outputs that exist (.h5/.safetensors files, output folders),
    scored as they are. Each variant's vectors (`vector`) are scored by a linear probe and k-NN (`k`) over
    `folds` stratified folds. The variants' files go to `workdir` (kept), else to a temporary folder (removed).
    `progress`: an `s2cli.Progress` for each extraction; `log`: a function told what is going on.

        >>> r = s2cli.probe("photos/", ["scales=1", "scales=1,2"], limit=200)
        >>> [(v.name, np.mean(v.probe_accuracy)) for v in r.variants]
    """
    paths = [os.fspath(p) for p in ([data] if isinstance(data, (str, os.PathLike)) else list(data))]
    tries = [tries] if isinstance(tries, str) else list(tries)
    require_sklearn()
    if vector not in VECTORS:
        raise ConfigError("--vector is not known", given=vector, expected=" | ".join(VECTORS), fix="pass --vector auto")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError("--k (the k-NN's neighbours) must be a positive integer", given=k, fix="pass --k 5")
    proto = Protocol(read_labels(labels) if labels is not None else None, label_column, limit, folds, k, seed, vector)
    log = log or (lambda m: None)
    outputs = [is_output(p) for p in paths]
    if any(outputs):
        if not all(outputs) or tries or recipe or options:
            raise ConfigError("probe takes either images to extract (one input, with --try variants) or outputs "
                              "that exist (files or folders written by `s2 extract`), not both", given=paths,
                              fix="pass one input with --try, or only outputs")
        return _probe_outputs(paths, proto, log)
    if len(paths) != 1:
        raise ConfigError("probe extracts one input", given=paths, fix="pass one folder, list or shards")
    variants = [parse_try(t) for t in tries] or [Variant("as given", {})]
    return _probe_data(paths[0], variants, proto, workdir, recipe, progress, log, options)


def _probe_outputs(paths: list[str], proto: Protocol, log: Callable[[str], None]) -> ProbeReport:
    """Score outputs that exist, on the keys they all hold."""
    readers = [open_features(p) for p in paths]
    try:
        held = [set(ff) for ff in readers]
        keys = [key for key in readers[0] if all(key in h for h in held[1:])]
        if len(keys) < max(len(h) for h in held):
            log(f"scoring the {len(keys)} keys that every output holds")
        metas = [readers[0].meta(key)["meta"] if proto.column is not None else None for key in keys]
        keys, labs = proto.sample(keys, [proto.label(key, m) for key, m in zip(keys, metas)])
        results = [proto.result(ff, keys, labs, path, {}) for path, ff in zip(paths, readers)]
    finally:
        for ff in readers:
            ff.close()
    return proto.report(results, keys, labs)


def _probe_data(data: str, variants: list[Variant], proto: Protocol, workdir: str | None, recipe: str | None,
                progress: Any, log: Callable[[str], None], options: dict[str, Any]) -> ProbeReport:
    """Extract the sample once per variant, then score every variant on the images all of them hold."""
    from . import api

    bad = sorted(set(options) - set(option_types()))
    if bad:
        raise TypeError(f"probe got unknown options {bad}")
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="s2probe-"))
    try:
        work.mkdir(parents=True, exist_ok=True)
        configs = []
        for i, v in enumerate(variants):  # every variant checked before anything runs
            opts = {"seed": proto.seed, **options, **v.options}
            configs.append(api.settings(data, str(work / f"{i}-{_slug(v.name)}.h5"), recipe=opts.pop("recipe", recipe),
                                        **opts))
        inp, keys, labs = _sample_input(api.open_inputs(configs[0]), proto)
        runs = []
        for i, (v, res) in enumerate(zip(variants, configs)):
            log(f"variant {i + 1}/{len(variants)} {v.name!r}: {len(keys)} images -> {res.output}")
            plan = dry_run(res, inp)
            summary = api.extract(inp, config=res, overwrite=True, progress=progress)
            runs.append((plan, summary))
        return _score_runs(variants, configs, runs, keys, labs, proto, log)
    finally:
        if not workdir:
            shutil.rmtree(work, ignore_errors=True)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.,=" else "_" for c in name)[:80] or "variant"


def _sample_input(inp: Input, proto: Protocol) -> tuple[Input, list[str], list[str]]:
    """The stratified sample of the input as an input of its own (one unit), with its keys and labels. Shards are
    read twice: once for the keys and labels, once more for the sampled images' bytes."""
    listed: list[tuple[str, str | None]] = []
    for unit in inp.units:
        for s in unit.samples():
            if isinstance(s, Sample):  # an unreadable stream member is left out here, as the run would record it
                meta = sample_meta(s) if proto.column is not None else None
                listed.append((s.key, proto.label(s.key, json.loads(meta) if meta else None)))
    keys, labs = proto.sample([key for key, _ in listed], [lab for _, lab in listed])
    wanted = set(keys)
    samples = [s for unit in inp.units for s in unit.samples() if isinstance(s, Sample) and s.key in wanted]
    return dataclasses.replace(inp, units=[Unit(0, f"probe[0:{len(samples)}]", samples)], total=len(samples),
                               limit=None), keys, labs


def _score_runs(variants: list[Variant], configs: list[Resolved], runs: list[tuple[dict, Any]], keys: list[str],
                labs: list[str], proto: Protocol, log: Callable[[str], None]) -> ProbeReport:
    """Score every variant's output on the sampled images that every variant extracted, with its costs."""
    readers = [open_features(res.output) for res in configs]
    try:
        held = [set(ff) for ff in readers]
        dropped = [key for key in keys if not all(key in h for h in held)]
        if dropped:
            log(f"{len(dropped)} sampled images failed in some variant and are left out of all: {dropped[:3]}")
            kept = [i for i, key in enumerate(keys) if key not in set(dropped)]
            keys, labs = [keys[i] for i in kept], [labs[i] for i in kept]
            check_labels(keys, labs, "the images every variant extracted")
            check_folds(labs, proto.folds)
        results = []
        for v, ff, (plan, summary) in zip(variants, readers, runs):
            n, flops = max(1, plan["num_images"]), plan["flops_estimate"]
            results.append(proto.result(ff, keys, labs, v.name, v.options, tiles_per_image=plan["total_tiles"] / n,
                                        flops_per_image=None if flops is None else flops / n,
                                        images_per_s=summary.images_per_s))
    finally:
        for ff in readers:
            ff.close()
    return proto.report(results, keys, labs, dropped)


def require_sklearn() -> None:
    """scikit-learn is there (the `probe` extra)."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise ConfigError("s2 probe fits its probes with scikit-learn, which is not installed", fix=EXTRA_FIX) from None


# ---- the plot -------------------------------------------------------------------------------------------------
def require_plotting() -> None:
    """matplotlib is there (the `probe` extra), said before any work when a plot is asked for."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("the probe plot needs matplotlib, which is not installed", fix=EXTRA_FIX) from None


def plot(report: ProbeReport, path: str) -> None:
    """Accuracy (mean ± std over folds; probe and k-NN) against each variant's cost per image: GFLOPs where the
    plan knows them, else stored MB."""
    require_plotting()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [v.to_dict() for v in report.variants]
    by_flops = all(r["flops_per_image"] is not None for r in rows)
    xs = [r["flops_per_image"] / 1e9 if by_flops else r["bytes_per_image"] / 1e6 for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for what, marker in (("probe_accuracy", "o"), ("knn_accuracy", "s")):
        ax.errorbar(xs, [r[f"{what}_mean"] for r in rows], yerr=[r[f"{what}_std"] for r in rows], fmt=marker,
                    capsize=3, label="linear probe" if what == "probe_accuracy" else f"{report.k}-NN")
    ax.axhline(max(report.classes.values()) / len(report.keys), color="grey", linestyle="--", linewidth=1,
               label="chance (the largest class)")
    for x, r in zip(xs, rows):
        ax.annotate(r["name"], (x, r["probe_accuracy_mean"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("GFLOPs per image" if by_flops else "stored MB per image")
    ax.set_ylabel(f"accuracy ({report.folds}-fold CV)")
    ax.set_title(f"{len(report.keys)} images, {len(report.classes)} classes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
