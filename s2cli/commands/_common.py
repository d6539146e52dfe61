"""What every command shares: the two consoles, the one place errors are printed, the parsing of list options,
and the settings of a command's extraction options."""
from __future__ import annotations

import contextlib
from dataclasses import fields
from typing import Any, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import ConfigError, S2Error
from ..launch import Terminated
from .layout import PREFIX

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


@contextlib.contextmanager
def reported(quiet: bool = False) -> Iterator[None]:
    """An S2Error inside becomes one line on stderr (what, given, expected, fix) and the command's exit code; a stop
    signal (SIGTERM, SIGUSR1) one line saying what was kept, and 128 + the signal's number. The libraries s2 drives
    print no progress bar when stderr is not a terminal, and nothing at all with `quiet` (-q) (`libraries`)."""
    try:
        with libraries(quiet):
            yield
    except Terminated as e:
        err.print(f"[yellow]stopped:[/yellow] {e.signame} (exit {e.code}); the shard in progress was abandoned and its "
                  "temporaries removed. An output folder keeps its done shards and the same command resumes it; an "
                  "output file was not written (the same command starts it over).", markup=True, highlight=False)
        raise
    except S2Error as e:
        # escaped: a message's own brackets (pip install 's2-features[video]', a key "a[1]") are text, not markup
        err.print(f"[red]{PREFIX}[/red] {escape(e.one_line())}", markup=True, highlight=False)
        raise typer.Exit(e.exit_code) from None


# the loggers of the libraries s2 drives, and the environment that silences them in a process started from here (or
# a library imported later): huggingface_hub's and transformers' progress bars, transformers' log lines
LOGGERS = ("transformers", "huggingface_hub", "timm", "torch", "filelock", "urllib3")
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
BARS_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}


@contextlib.contextmanager
def libraries(quiet: bool) -> Iterator[None]:
    """While a command runs: with `quiet`, no progress bar, log line or warning of transformers, huggingface_hub,
    timm or torch (errors still reach the user: they are S2Errors, printed by `reported`); without it, no progress
    bar when stderr is not a terminal (a SLURM log, a file, a pipe) unless HF_HUB_DISABLE_PROGRESS_BARS is set
    (=0: show them). Everything is restored after."""
    import os

    env = QUIET_ENV if quiet else BARS_ENV if not err.is_terminal and "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ \
        else {}
    if not env:
        yield
        return
    import logging
    import warnings

    bars = _bars(False)  # first: huggingface_hub reads HF_HUB_DISABLE_PROGRESS_BARS once, when imported
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    levels = {n: logging.getLogger(n).level for n in LOGGERS} if quiet else {}
    for name in levels:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            if quiet:
                warnings.simplefilter("ignore")
            yield
    finally:
        _bars(bars)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for k, v in saved_env.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _bars(on: bool) -> bool:
    """Turn huggingface_hub's and transformers' progress bars on or off; whether they were on."""
    import sys

    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was = not are_progress_bars_disabled()
    tf = sys.modules.get("transformers.utils.logging")
    if tf is not None:
        was = was and tf.is_progress_bar_enabled()
        tf.enable_progress_bar() if on else tf.disable_progress_bar()  # it turns the hub's with its own
    else:
        enable_progress_bars() if on else disable_progress_bars()
    return was


@contextlib.contextmanager
def stops_quietly() -> Iterator[None]:
    """A command that only reads: SIGTERM or SIGUSR1 unwinds it (readers closed, downloaded shards removed) and
    exits with 128 + the signal's number, without the run's "stopped" message."""
    from ..launch import sigterm_raises

    try:
        with sigterm_raises():
            yield
    except Terminated as e:
        raise SystemExit(e.code) from None


@contextlib.contextmanager
def offline(on: bool | None) -> Iterator[None]:
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


def entries(n: int) -> str:
    """A count of stored entries as every command prints it: an image is one entry, a video (all its frames) one,
    a frame stored on its own (--frames-as-images) one: "1 entry", "3 entries"."""
    return f"{n} {'entry' if n == 1 else 'entries'}"


def floats(name: str, text: Optional[str]) -> Optional[tuple[float, ...]]:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--{name} must be comma-separated numbers", given=text, fix=f"e.g. --{name} 1,2,3") from None


def ints(name: str, text: Optional[str]) -> Optional[tuple[int, ...]]:
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--{name} must be comma-separated integers", given=text,
                          fix=f"e.g. --{name} 336,672,1008") from None


def given(ctx: typer.Context) -> dict[str, Any]:
    """The parameters the user set (on the command line or in the environment): an option left at its default
    is "not set", so a recipe's value stays in force, and only what was set is forwarded to workers and jobs."""
    return {k: v for k, v in ctx.params.items()
            if ctx.get_parameter_source(k) is None or ctx.get_parameter_source(k).name not in ("DEFAULT", "DEFAULT_MAP")}


def settings(values: dict[str, Any]) -> Any:
    """The resolved settings of a command's parameters: those that are extraction options (ExtractConfig's fields),
    the lists parsed; every other parameter is the command's own."""
    from .. import api
    from ..config import ExtractConfig

    names = {f.name for f in fields(ExtractConfig)} - {"input", "output", "recipe", "provenance"}
    options = {k: v for k, v in values.items() if k in names}
    options.update(scales=floats("scales", values.get("scales")), img_sizes=ints("img-sizes", values.get("img_sizes")))
    return api.settings(values["input"], values.get("output"), recipe=values.get("recipe"), **options)
