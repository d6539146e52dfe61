"""`s2 extract`: one call to `s2cli.extract` (or `s2cli.plan` with --dry-run, or the `--devices` launcher), with a
progress bar."""
from __future__ import annotations

import json
import sys
from inspect import signature
from typing import Any

import typer
from rich.table import Table
from typer.models import ArgumentInfo, ParameterInfo

from .. import api
from ..errors import S2Error
from . import options as o
from ._common import entries, err, given, offline, out, reported, settings


@o.with_options()
def extract(ctx: typer.Context, input: o.Input, **kw: Any) -> None:
    """Extract multi-scale features of every image in INPUT into one file or a resumable folder of shards.

    Examples:
      s2 extract photos/ --model clip-vit-l-336 --scales 1,2,3 -o photos.h5
      s2 extract 'shards/{00000..00099}.tar' --recipe llava-1.5-s2 -o feats/ --devices all
    """
    values, as_json, devices = given(ctx), kw["as_json"], kw["devices"]
    with reported(kw["quiet"]), offline(kw["offline"]):
        res = settings(values)
        inp = api.open_inputs(res)  # checked (a missing input, key clashes) before any weights load
        if kw["dry_run"]:
            plan = api.plan(input, config=res)
            print(json.dumps(plan)) if as_json else print_plan(plan)
            return
        if devices is not None:
            report = api.extract_on_devices(res, devices, extract_argv(values), device=values.get("device"),
                                            overwrite=kw["overwrite"], log=lambda m: err.print(m, highlight=False),
                                            progress=BarProgress(show=not kw["quiet"]), inp=inp)
            return _print_devices(report, devices, res.output, as_json)
        summary = api.extract(inp, kw["output"], config=res, overwrite=kw["overwrite"],
                              progress=BarProgress(show=not kw["quiet"]))
    if as_json:  # one write, newline included: ranks that share a pipe (torchrun's, unbuffered) cannot split lines
        sys.stdout.write(json.dumps(summary.to_dict()) + "\n")
    else:
        err.print(f"{entries(summary.num_images)}, {summary.num_failed} failed -> {summary.output} "
                  f"({summary.images_per_s} img/s)", highlight=False)
    if summary.nothing_extracted:
        with reported():
            raise S2Error(f"every sample failed ({summary.num_failed}), nothing was extracted",
                          given=str(input), expected="at least one readable image",
                          fix=inp.fix)


def progress_s() -> float:
    """Seconds between the plain progress lines of a run whose stderr is not a terminal (S2CLI_PROGRESS_S,
    default 60): a SLURM log, a file, a pipe."""
    import os

    try:
        return float(os.environ.get("S2CLI_PROGRESS_S", "60"))
    except ValueError:
        raise S2Error("S2CLI_PROGRESS_S must be a number of seconds", given=os.environ["S2CLI_PROGRESS_S"],
                      fix="unset it, or set e.g. S2CLI_PROGRESS_S=60") from None


class BarProgress:
    """`s2cli.extract`'s progress on stderr: a Rich bar (images/s, ETA when the total is known or estimated,
    failures, shards) on a terminal, on rank 0 only; else (a SLURM log, a file) a plain line every
    `progress_s()` seconds as batches end, on every rank."""

    def __init__(self, show: bool = True) -> None:
        self.show, self.bar, self.lines = show, None, False

    def start(self, res, total, done_before: int, shards_before: int, rank: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.before, self.shards_before, self.total_n, self.rank = done_before, shards_before, total, rank
        if not self.show:
            return
        if not err.is_terminal:
            import time

            self.lines, self.every = True, progress_s()
            self.t0 = self.last = time.monotonic()
            return
        if rank != 0:
            return
        columns = [TextColumn("[bold]extract"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]} img/s"),
                   TimeRemainingColumn(), TextColumn("{task.fields[failed]} failed")]
        if res.output_is_dir:  # one file has no shards to count
            columns.append(TextColumn("{task.fields[shards]} shards"))
        self.bar = Progress(*columns, console=err, transient=False)
        self.task = self.bar.add_task("extract", total=total, completed=done_before, rate="-", failed=0,
                                      shards=shards_before)
        self.bar.start()

    def total(self, total: int) -> None:
        self.total_n = total
        if self.bar is not None:
            self.bar.update(self.task, total=total)

    def update(self, done: int, failed: int, shards: int) -> None:
        if self.lines:
            return self._line(done, failed, shards)
        if self.bar is None:
            return
        elapsed = self.bar.tasks[self.task].elapsed or 0
        rate = f"{done / elapsed:.1f}" if elapsed > 0 else "-"
        self.bar.update(self.task, completed=self.before + done + failed, rate=rate, failed=failed,
                        shards=self.shards_before + shards)

    def _line(self, done: int, failed: int, shards: int) -> None:
        """One plain line, when `progress_s()` seconds passed since the last: counts, rate, ETA."""
        import datetime
        import time

        now = time.monotonic()
        if now - self.last < self.every:
            return
        self.last = now
        rate = (done + failed) / (now - self.t0) if now > self.t0 else 0.0
        seen = self.before + done + failed
        count = f"{seen}/{entries(self.total_n)} ({100 * seen / max(1, self.total_n):.1f}%)" if self.total_n else entries(seen)
        eta = ""
        if self.total_n and rate > 0:
            eta = f", ETA {datetime.timedelta(seconds=round(max(0, self.total_n - seen) / rate))}"
        who = f"extract rank {self.rank}" if self.rank else "extract"
        err.print(f"{who}: {count}, {failed} failed, {self.shards_before + shards} shards, {_rate(rate)} img/s{eta}",
                  highlight=False, soft_wrap=True)

    def note(self, message: str) -> None:
        err.print(message, highlight=False)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def print_plan(plan: dict) -> None:
    t = Table(title=f"plan: {plan['model']} sizes {plan['img_sizes']} split {plan['max_split_size']} fit {plan['fit']}")
    for c in ("key", "orig h×w", "tiles", "grids", "output (T, C)", "bytes"):
        t.add_column(c)
    for im in plan["images"]:
        t.add_row(im["key"], "×".join(map(str, im["orig_hw"])), str(im["tiles"]),
                  " ".join(f"{r}×{c}" for r, c in im["grids"]), str(tuple(im["output_shape"])), f"{im['bytes']:,}")
    out.print(t)
    flops = plan["flops_estimate"]
    out.print(f"{entries(plan['num_images'])}, {plan['total_tiles']} tiles, "
              f"{'%.3g TFLOP' % (flops / 1e12) if flops is not None else 'FLOPs unknown'}, "
              f"{plan['total_bytes'] / 2**20:.1f} MiB of features -> {plan['output']}", highlight=False)
    for u in plan["unreadable"]:
        out.print(f"unreadable: {u['key']} ({u['error_class']}: {u['error']})", highlight=False)


# options of `extract` that describe one process's console, not the extraction: not forwarded to workers and jobs
CONSOLE_ONLY = ("ctx", "devices", "dry_run", "as_json", "quiet")


def option_argv(fn, values: dict, skip: tuple[str, ...] = ()) -> list[str]:
    """The command line that gives `fn`'s Typer parameters these values: arguments in order, options by their
    first long name; None (not set) and a plain flag left off are omitted, so a recipe's values stay in force."""
    params = signature(fn, eval_str=True).parameters
    argv: list[str] = []
    for name, param in params.items():
        if name in skip or values.get(name) is None:
            continue
        info = next((m for m in getattr(param.annotation, "__metadata__", ()) if isinstance(m, ParameterInfo)), None)
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


def extract_argv(values: dict[str, Any]) -> list[str]:
    """`python -m s2cli extract …` with the same extraction options as `values` (an extract call's params)."""
    return [sys.executable, "-m", "s2cli", "extract", *option_argv(extract, values, CONSOLE_ONLY)]


def _print_devices(report: dict[str, Any], devices: str, output: str, as_json: bool) -> None:
    """The per-worker table of a --devices run; exit non-zero if any worker failed."""
    workers = report["workers"]
    if as_json:
        print(json.dumps(report))
    else:
        t = Table(title=f"--devices {devices}")
        for c in ("rank", "device", "exit", "entries", "failed", "shards", "img/s", "error"):
            t.add_column(c, overflow="fold")
        for w in workers:
            s = w["summary"] or {}
            t.add_row(str(w["rank"]), w["device"], str(w["exit_code"]), str(s.get("num_images", "-")),
                      str(s.get("num_failed", "-")), str(s.get("shards_written", "-")), str(s.get("images_per_s", "-")),
                      w["error"] or "")
        err.print(t)
        st = report["status"]
        err.print(f"{entries(st['images'])}, {st['failed']} failed in {st['shards_done']} shards; "
                  f"{'complete' if st['complete'] else 'not complete'} -> {output}", highlight=False)
    bad = [w["exit_code"] for w in workers if w["exit_code"] != 0]
    if bad:
        raise typer.Exit(max(bad))


def _rate(per_s: float) -> str:
    """A rate as the plain lines print it: two decimals, or two significant digits below 0.1 (a video of 8 large
    frames on a CPU takes minutes: 0.0031, not 0.00)."""
    return f"{per_s:.2f}" if per_s >= 0.1 or per_s == 0 else f"{per_s:.2g}"
