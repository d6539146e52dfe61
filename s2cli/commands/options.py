"""The options of `s2 extract` as Typer parameters, shared by every command that takes them (extract, bench, slurm,
viz plan), as huggingface_hub's CLI shares its options. Each extraction option is declared once, on its
ExtractConfig field (config.py `opt`: flags, help, panel, choices, shown default, saved/compared on resume); this
module makes its parameter from that declaration: the default shown in --help is ExtractConfig's, while a value
left at it counts as "not set" (so a recipe's value is not overridden), and a choice's values are listed in --help
and offered by shell completion (checked by the config, which says what was given and the fix). A command's
console options (--json, --quiet, ...) are declared here."""
from __future__ import annotations

import typing
from inspect import Parameter, Signature, signature
from typing import Annotated, Any, Callable, Iterable, Optional

import typer

from ..config import INPUT, MODEL, OPTION_DECLS, OUTPUT, PANELS, RUN, SCALES, SPEED, STRATEGY, ExtractConfig, Opt

__all__ = ["INPUT", "MODEL", "SCALES", "STRATEGY", "OUTPUT", "SPEED", "RUN", "OPTIONS", "declare", "option",
           "with_options", "Input", "Json", "Offline", "Overwrite", "Devices", "DryRun", "Quiet"]


def _complete(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    return lambda incomplete: [c for c in choices if c.startswith(incomplete)]


def option(*decls: str, help: str, panel: str, shown: str | None = None, choices: Iterable[str] = ()) -> Any:
    """A Typer option in `panel`. Its default is the parameter's (for an extraction option, its ExtractConfig
    default), shown as is; an option whose default depends on the model has None and says so in `shown`."""
    kw: dict[str, Any] = {"help": help, "rich_help_panel": panel}
    if shown is not None:
        kw["show_default"] = shown
    choices = tuple(choices)
    if choices:
        kw.update(metavar="|".join(choices), autocompletion=_complete(choices))
    return typer.Option(*decls, **kw)


# every option, in the order --help lists them within a panel: name -> (annotation, default). An option's default
# is ExtractConfig's (None where the model decides, said in its `shown` text); the others' is off.
OPTIONS: dict[str, tuple[Any, Any]] = {}


def declare(name: str, typ: Any, info: Any) -> Any:
    """Declare the console option `name` of a command once, for every command that takes it (`with_options`).
    The extraction options are declared in config.py (`ExtractConfig`'s fields) and made here by `_extraction`."""
    annotation = Annotated[typ, info]
    OPTIONS[name] = (annotation, getattr(ExtractConfig, name, None) if name in OPTION_DECLS else (
        False if typ is bool else None))
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
_HINTS = typing.get_type_hints(ExtractConfig)


def _cli_type(name: str) -> Any:
    """What the command line gives for a field: a list (scales, sizes, pinpoints) as its text, parsed by the
    settings; None is "not set"."""
    kinds = set(typing.get_args(_HINTS[name])) or {_HINTS[name]}
    return next((t for typ, t in ((bool, Bool), (int, Int), (float, Float)) if typ in kinds), Str)


def _extraction(name: str, decl: Opt) -> Any:
    """The Typer parameter of an extraction option, from its one declaration."""
    if not decl.flags:
        return Annotated[str, typer.Argument(help=decl.help)]
    return declare(name, _cli_type(name), option(*decl.flags, help=decl.help, panel=decl.panel, shown=decl.shown,
                                                 choices=decl.allowed))


Input = _extraction("input", OPTION_DECLS["input"])
for _name, _decl in sorted(OPTION_DECLS.items(), key=lambda kv: PANELS.index(kv[1].panel)):  # --help's panel order
    if _name != "input":
        _extraction(_name, _decl)

# ---- the console options of a command (not extraction settings: never saved, not forwarded as such) -------------
Offline = declare("offline", bool, option("--offline", help="Never reach the hub: weights come from the HF cache only (as "
                                          "HF_HUB_OFFLINE=1).", panel=MODEL))
Overwrite = declare("overwrite", bool, option("--overwrite", help="Replace an existing output file, or start OUTDIR/ over.",
                                              panel=OUTPUT))
Devices = declare("devices", Str, option("--devices", help="One worker process per device on this machine: all | 0,1,2,3 | "
                                         "cpu,cpu (needs -o OUTDIR/).", panel=SPEED))
DryRun = declare("dry_run", bool, option("--dry-run", help="Print the plan; load no weights, read headers only.", panel=RUN))
Json = declare("as_json", bool, typer.Option("--json", help="Print machine-readable JSON on stdout."))
Quiet = declare("quiet", bool, option("--quiet", "-q", help="No progress bar or log line, s2's or its libraries' "
                                      "(errors still print).", panel=RUN))
