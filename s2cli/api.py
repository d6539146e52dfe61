"""The library's front door: `extract` puts a run together (settings, weights, rank, device, target, backbone),
runs it and returns its `Summary`; `plan` is the dry run; `fetch` downloads models ahead of runs. The CLI,
`s2 bench`, the benchmarks, `--devices` workers and SLURM tasks all go through `extract`."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

from . import backbones
from .config import Resolved, load_recipe, resolve_options
from .errors import ConfigError
from .inputs.dataset import spec_of
from .inputs.resolve import open_input
from .inputs.units import Input
from .plan import dry_run
from .store import reach
from .strategies import strategy_of
from .weights import Located, locate


class Progress:
    """What `extract` tells about a run as it goes; subclass it for a progress bar. The default says nothing."""

    def start(self, res: Resolved, total: int | None, done_before: int, shards_before: int, rank: int) -> None:
        """The run starts: `total` images in its share of the input (None: not known up front), `done_before`
        images (done or failed) and `shards_before` shards from an earlier run of this output; `rank` of this
        process among the ranks sharing the output."""

    def update(self, done: int, failed: int, shards: int) -> None:
        """So far in this run: images written, failed, shards written."""

    def total(self, total: int) -> None:
        """The total of `start` estimated again (WebDataset input: from the samples of the tars read so far)."""

    def note(self, message: str) -> None:
        """A line worth telling (the output name when it was chosen for the user, a resume)."""

    def finish(self) -> None:
        """The run ended (done, or failed with an exception)."""


def settings(input: str, output: str | None = None, *, recipe: str | None = None, **options: Any) -> Resolved:
    """The resolved settings of a run (defaults < recipe < options), checked before any weights load. `input` and
    `output` may be paths (`os.PathLike`)."""
    return resolve_options(_fspath(input), _fspath(output), recipe, **options)


def _fspath(p: Any) -> Any:
    return os.fspath(p) if isinstance(p, os.PathLike) else p


def open_inputs(res: Resolved, obj: Any = None) -> Input:
    """The run's input, listed (folders, lists, files) or named (shards, tables, datasets); `obj`: a Python
    dataset given in place of a path."""
    inp = open_input(res.input if obj is None else obj, res.input_format, res.shard_size, res.limit, res.image_key,
                     res.meta_columns, res.keep_ext, videos=res.sampling.active, image_column=res.image_column,
                     key_column=res.key_column)
    if res.num_samples is not None and inp.total is not None:
        raise ConfigError("--num-samples gives the progress total of WebDataset shards; a folder, list or table is "
                          "counted as it is listed", given=f"--num-samples {res.num_samples} for {inp.kind} input "
                          f"{inp.spec}", fix="drop --num-samples")
    return inp


def plan(input: str, output: str | None = None, *, recipe: str | None = None, config: Resolved | None = None,
         **options: Any) -> dict[str, Any]:
    """The dry run: every image's plan from its header (tiles per scale or view, output tokens x channels, bytes)
    and the totals. No weights, no model, no pixels, no torch."""
    res = config if config is not None else settings(input, output, recipe=recipe, **options)
    return dry_run(res, open_inputs(res))


def extract(input: str | Input, output: str | None = None, *, recipe: str | None = None,
            config: Resolved | None = None, overwrite: bool = False, progress: Progress | None = None,
            backbone: Any = None, **options: Any) -> Any:
    """Extract multi-scale features of every image of `input` into `output` and return the run's `Summary`.

    `input`: a folder, a .txt/.csv/.parquet list, WebDataset shards (a brace pattern, a glob, a folder of .tar,
    pipe:CMD), or an `Input` built in memory. `output`: a .h5 or .safetensors file, or `OUTDIR/` for resumable
    shards (default `<input>.<model>.h5` here). `options` are the settings of `s2 extract` by their Python names
    (model, scales, img_sizes, batch_size, workers, device, strategy, pool, ... : see `ExtractConfig`), over the
    recipe's; or pass `config`, already resolved by `settings`. `backbone`: an already loaded `Backbone` to reuse.
    Under torchrun or SLURM this process extracts its rank's share into the shared `OUTDIR/`.

        >>> s = s2cli.extract("photos/", "feats.h5", model="clip-vit-l-336", scales=(1, 2, 3))
        >>> s.num_images, s.images_per_s
    """
    from .launch import die_with_parent, discover_rank, sigterm_raises

    if "devices" in options:
        raise ConfigError("s2cli.extract runs one rank: --devices is the command line's launcher, and a Python object "
                          "cannot be sent to its workers", given=f"devices={options['devices']!r}",
                          fix="run one process per device (torchrun --nproc_per_node N script.py, each calling "
                              "s2cli.extract(ds, 'OUTDIR/')), or save the dataset (save_to_disk, parquet) and run "
                              "`s2 extract PATH -o OUTDIR/ --devices ...`")
    obj = None if isinstance(input, (str, os.PathLike, Input)) else input  # a torch / datasets Dataset
    spec = input.spec if isinstance(input, Input) else spec_of(obj) if obj is not None else os.fspath(input)
    res = config if config is not None else settings(spec, output, recipe=recipe, **options)
    inp = input if isinstance(input, Input) else open_inputs(res, obj)
    rank = discover_rank()
    if rank.source == "devices":
        die_with_parent()
    reach(res.output)  # a store that is down: one line before weights are located (a download can take minutes)
    located = None
    if backbone is None:  # before torch: offline, a model not in the cache is one line at once
        res, located = locate_weights(res)
    else:
        _check_layers(res, backbone)
        res = dataclasses.replace(res, weights_revision=backbone.revision)
    with sigterm_raises():  # SIGTERM/SIGUSR1: the unfinished shard or file removed, the claim given back, exit 143/138
        return _extract(res, inp, rank, output is None and config is None, overwrite, progress, backbone, located)


def _check_layers(res: Resolved, backbone: Any) -> None:
    """A backbone handed in runs to the layers these settings store."""
    want = list(res.layers) if res.layers is not None else [res.backbone.layer]
    if list(getattr(backbone, "layers", want)) != want:
        raise ConfigError("the backbone passed in runs to other layers than these settings store",
                          given=f"backbone layers {backbone.layers}", expected=f"layers {want}",
                          fix="load it with s2cli.api.load(settings), or drop backbone=")


def _extract(res: Resolved, inp: Input, rank: Any, named: bool, overwrite: bool, progress: Progress | None,
             backbone: Any, located: Any) -> Any:
    from .launch import pin_device, rank_device
    from .run import Run, Target, TotalEstimate

    device = rank_device(res.device, rank)
    target = Target(res, inp, overwrite, rank)  # claims the output, refuses a clashing one (other weights too) before they load
    try:  # from here on, however it ends (a stop signal between any two lines too), the heartbeat says how
        if target.nothing_to_do:  # a finished folder's rerun: answered from its markers, the model never loads
            return _already_done(res, target, progress or Progress(),
                                 located.record if located else backbone.weights, str(device))
        pin_device(device)  # before the model loads
        backbone = backbone if backbone is not None else load(res, located)
        run = Run(res, inp, target, backbone, device)
        progress = progress or Progress()
        if named:
            progress.note(f"writing {res.output}")
        _notes(progress, res, target)
        before = 0 if res.retry_failed else target.images_done_before + target.failures_before
        total = share_total(res, inp, target)
        progress.start(res, total, before, len(target.markers), rank.rank)
        run.on_progress = progress.update
        if total is None and inp.streamed and hasattr(progress, "total"):  # estimated as the tars are read
            run.estimate, run.on_total = TotalEstimate(before, target.units_to_read), progress.total
        try:
            return run.execute()
        finally:
            progress.finish()
    except BaseException as e:  # the claim is given back and a folder's heartbeat says why (once: a run that
        target.close_after(e)  # ended its heartbeat already, done or preempted, keeps what it said)
        raise


def _already_done(res: Resolved, target: Any, progress: Progress, weights: str, device: str) -> Any:
    for m in target.broken:
        progress.note(f"{res.output}: done shard {m['shard']} is broken ({m['broken']}); it is redone")
    progress.note(f"{res.output} is done already: {len(target.markers)} shards ({target.images_done_before} "
                  "images); nothing left to extract")
    return target.finish_done(weights, device)


def _notes(progress: Progress, res: Resolved, target: Any) -> None:
    """What is worth telling before a run starts: broken shards, a changed input, a resume, what --retry-failed
    retries."""
    for m in target.broken:
        progress.note(f"{res.output}: done shard {m['shard']} is broken ({m['broken']}); it is redone")
    if target.changed:
        progress.note(f"the input changed since {res.output} was written: {target.changed} of its done shards "
                      "no longer match it (images added, removed or renamed) and are redone")
    if target.accepted:
        progress.note(f"{target.accepted} done shards of {res.output} come from tars rewritten since; --retry-failed "
                      "keeps them and retries their recorded failures from the tars as they are now")
    if res.retry_failed:
        n = target.retry_keys
        progress.note(f"retrying {_entries(n)} recorded as failed in {res.output}" if n else
                      f"nothing to retry: {res.output} records no failed entry (of this rank's share)")
    elif target.markers:
        progress.note(f"resuming {res.output}: {len(target.markers)} shards ({_entries(target.images_done_before)}) "
                      "already done")


def share_total(res: Resolved, inp: Input, target: Any) -> int | None:
    """The images this process's run goes through, when known up front: the failures --retry-failed retries; a
    folder's or list's share (its units' sizes); WebDataset's --num-samples (a rank: its share of the tars)."""
    if res.retry_failed:
        return target.retry_keys
    mine = [u for u in inp.units if target.ranks.owns(u.index)]
    if inp.total is not None:
        return min(inp.total, sum(u.count or 0 for u in mine))
    if res.num_samples is not None and inp.units:
        return round(res.num_samples * len(mine) / len(inp.units))
    return None


def locate_weights(res: Resolved) -> tuple[Resolved, Located]:
    """The run's weights, found before anything loads them (a hub model is downloaded now on first use, by one
    process per node; offline, a miss is one line), and the settings with their revision, which a resumed run
    must match. Imports no torch for a hub model."""
    located = locate(res.backbone, res.weights, res.random_init, res.seed)
    return dataclasses.replace(res, weights_revision=located.revision), located


def load(res: Resolved, located: Located | None = None) -> Any:
    """The backbone of these settings, loaded (weights, --random-init) on the CPU; `located`: its weights as
    `locate_weights` found them (else found now)."""
    return backbones.load_backbone(res.backbone, weights=res.weights, random_init=res.random_init, seed=res.seed,
                                   any_size=strategy_of(res).any_size, located=located, embed=res.pool == "embed",
                                   layers=res.layers)


def fetch(*models: str, recipes: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Download what runs of these models (aliases, hf:org/name[@revision], timm:<name>, timm:hf-hub:org/name)
    and of these recipes' models will need: config, preprocessor and weights, into the HF cache (HF_HOME). Offline
    (HF_HUB_OFFLINE=1) it checks the cache instead. One record per model: its revision (org/name@sha) and cache
    path. Then a run there, or on any machine that sees this cache, works with HF_HUB_OFFLINE=1.

        >>> s2cli.fetch("clip-vit-l-336", recipes=["vila-1.5-s2"])
    """
    specs = list(models) + [load_recipe(r)[0].get("model", "efficientnet-lite0") for r in recipes]
    if not specs:
        raise ConfigError("nothing to fetch", fix="name models (s2 fetch clip-vit-l-336) or recipes (--recipe llava-1.5-s2)")
    return [backbones.fetch(spec) for spec in dict.fromkeys(specs)]




def extract_on_devices(res: Resolved, devices: str, argv: list[str], *, device: str | None = None,
                       overwrite: bool = False, log: Any = None, progress: Progress | None = None,
                       inp: Input | None = None) -> dict[str, Any]:
    """`--devices`: one `argv` worker process (an `s2 extract` of these settings) per device of this machine, as
    ranks of one run into the shared output folder; waits for all, telling `progress` what they did together (from
    their heartbeats). Returns each worker's exit code and summary, and the folder's status."""
    import os

    from .errors import ConfigError
    from .launch import parse_devices, run_workers
    from .status import status_report

    if "RANK" in os.environ or "SLURM_STEP_ID" in os.environ:
        raise ConfigError("--devices starts its own workers, and this process is already one rank of a launcher",
                          given=devices, fix="drop --devices under torchrun/srun (they start one process per GPU)")
    if device is not None:
        raise ConfigError("--device and --devices were both given", given=(device, devices),
                          fix="pass --devices alone: each worker gets one of its devices")
    if not res.output_is_dir:
        raise ConfigError("--devices needs an output folder that the workers share", given=res.output,
                          fix="pass -o OUTDIR/")
    devs = parse_devices(devices)
    if overwrite:
        raise ConfigError("--overwrite cannot be used by several workers at once", given=devices,
                          fix=f"remove {res.output} first, then run without --overwrite")
    reach(res.output)

    from .outdir import OutputDir

    OutputDir(res.output).refuse_running()  # a live run in the folder: no worker starts (each would be refused, or not)
    _, located = locate_weights(res)  # downloaded here once (first use), not by every worker at the same time
    if log:
        log(f"{len(devs)} workers ({', '.join(devs)}) -> {res.output}; weights {located.record}")
    inp = inp or open_inputs(res)
    inp.fetch_ahead()  # a hub dataset's files into the HF cache here, once, as the weights: the workers run offline
    tick = _devices_progress(res, inp, len(devs), progress or Progress())
    try:
        workers = run_workers(argv, devs, env={"HF_HUB_OFFLINE": "1"}, on_tick=tick)
    finally:
        (progress or Progress()).finish()
    return {"workers": workers, "status": status_report(res.output)}


def _devices_progress(res: Resolved, inp: Input, n: int, progress: Progress) -> Any:
    """Start `progress` for the whole folder and return the function that tells it, from the heartbeats of the
    `n` workers started from now on, what they have done together."""
    import time

    from .heartbeat import read_heartbeats
    from .outdir import OutputDir

    d = OutputDir(res.output)
    markers = d.markers() if d.has_run and not res.retry_failed else []
    d.folder.close()  # a remote shard fetched to check its bytes: out of the cache
    before = sum(m["num_images"] + m["num_failed"] for m in markers)
    total = inp.total if inp.total is not None else res.num_samples
    progress.start(res, None if res.retry_failed else total, before, len(markers), 0)
    launched = time.time()

    def tick() -> None:
        hbs = [hb for r, hb in read_heartbeats(d.path).items() if r < n and float(hb.get("started", 0)) >= launched - 1]
        progress.update(*(sum(int(hb.get(k) or 0) for hb in hbs) for k in ("images", "failed", "shards_written")))

    return tick


def _entries(n: int) -> str:
    """A count of stored entries (an image, a video, a frame stored on its own: one each), as the CLI says them."""
    return f"{n} {'entry' if n == 1 else 'entries'}"
