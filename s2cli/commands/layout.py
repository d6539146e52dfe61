"""How `s2` shows itself: help that fits any terminal width with nothing cut (click's plain formatter, wrapping
at spaces; options grouped by panel, the common ones first; examples kept as lines), and usage errors as one line
with the same `error:` prefix as every other error."""
from __future__ import annotations

import sys
import textwrap
from typing import Any

import typer
from typer._click.formatting import HelpFormatter
from typer.core import TyperCommand, TyperGroup

# the options most runs set, listed first (in this order) by every command that takes them
COMMON = ("model", "recipe", "scales", "output", "format", "batch_size", "device", "dry_run", "quiet", "as_json")
PREFIX = "error:"  # the one prefix of an error line, usage errors included (_common.reported prints the others)


def wrap(text: str, width: int, indent: str = "", first: str | None = None) -> list[str]:
    """`text` in lines of at most `width` characters, broken at spaces only: a word (a flag, a hyphenated name, a
    path) is never split; one longer than the width has a line of its own."""
    return textwrap.wrap(" ".join(text.split()), max(width, 20), initial_indent=indent if first is None else first,
                         subsequent_indent=indent, break_long_words=False, break_on_hyphens=False) or [""]


class Formatter(HelpFormatter):
    """click's help formatter, wrapping at spaces only; an `Example` paragraph keeps its lines, and one longer than
    the width continues on the next line after ` \\` (as a shell reads it)."""

    def write_text(self, text: str) -> None:
        indent = " " * self.current_indent
        for i, paragraph in enumerate(p for p in text.split("\n\n") if p.strip()):
            self.write("\n" if i else "")
            if not paragraph.lstrip().startswith("Example"):
                self.write("\n".join(wrap(paragraph, self.width, indent)) + "\n")
                continue
            for line in paragraph.splitlines():
                lead = indent + " " * (len(line) - len(line.lstrip()))
                parts = wrap(line, self.width - len(lead) - 2)
                self.write(" \\\n".join(lead + ("    " if j else "") + p for j, p in enumerate(parts)) + "\n")

    def write_dl(self, rows: Any, col_max: int = 30, col_spacing: int = 2) -> None:
        rows = list(rows)
        first_col = min(max(len(a) for a, _ in rows), col_max) + col_spacing
        at = " " * (first_col + self.current_indent)
        for first, second in rows:
            head = " " * self.current_indent + first
            if not second:
                self.write(head + "\n")
                continue
            if len(first) > first_col - col_spacing:
                self.write(head + "\n")
                head = at
            lines = wrap(second, self.width, at, first=head.ljust(len(at)))
            self.write("\n".join(lines) + "\n")


class Context(typer.Context):
    formatter_class = Formatter


class Command(TyperCommand):
    """A command whose help lists its arguments, its common options, then one section per panel in declaration
    order, then the rest."""

    context_class = Context

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        from .complete import BY_NAME

        for param in self.params:  # --model, --recipe: completed from their registries, in every command
            if param.name in BY_NAME and param._custom_shell_complete is None:
                param._custom_shell_complete = lambda ctx, p, incomplete, f=BY_NAME[param.name]: f(incomplete)

    def format_options(self, ctx: Any, formatter: Any) -> None:
        args, opts = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                (args if param.param_type_name == "argument" else opts).append((param, record))
        if args:
            with formatter.section("Arguments"):
                formatter.write_dl([r for _, r in args])
        panels = [getattr(p, "rich_help_panel", None) for p, _ in opts]
        if not any(panels):
            with formatter.section("Options"):
                formatter.write_dl([r for _, r in opts])
            return
        common = sorted((o for o in opts if o[0].name in COMMON), key=lambda o: COMMON.index(o[0].name))
        sections: dict[str, list] = {"Common options": [r for _, r in common]}
        for (param, record), panel in zip(opts, panels):
            if param.name not in COMMON:
                sections.setdefault(panel or "Other options", []).append(record)
        sections["Other options"] = sections.pop("Other options", [])
        for name, rows in sections.items():
            if rows:
                with formatter.section(name):
                    formatter.write_dl(rows)


def first_sentence(cmd: Any) -> str:
    """A command's line in its group's listing: the first sentence of its help, whole."""
    text = " ".join((cmd.short_help or cmd.help or "").strip().split("\n\n")[0].split())
    head, dot, _ = text.partition(". ")
    return head + "." if dot else text


class Group(TyperGroup):
    """A group of commands: each listed with the first sentence of its help (never cut short); a usage error of
    any command below it is one line, `error: MESSAGE (see: s2 CMD --help)`, exit 2."""

    context_class = Context

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        rows = [(name, first_sentence(cmd)) for name in self.list_commands(ctx)
                if (cmd := self.get_command(ctx, name)) is not None and not cmd.hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def main(self, *args: Any, standalone_mode: bool = True, **kw: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kw)
        from typer._click import exceptions as ex

        try:
            code = super().main(*args, standalone_mode=False, **kw)
        except ex.NoArgsIsHelpError as e:
            e.show()
            sys.exit(e.exit_code)
        except ex.ClickException as e:
            where = f" (see: {e.ctx.command_path} --help)" if getattr(e, "ctx", None) is not None else ""
            print(f"{PREFIX} {e.format_message()}{where}", file=sys.stderr)
            sys.exit(e.exit_code)
        except ex.Abort:
            print(f"{PREFIX} aborted", file=sys.stderr)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


class App(typer.Typer):
    """A Typer app whose commands and groups show themselves as above (every `app.command(...)`, also one added
    by a module that knows nothing of this one)."""

    def __init__(self, **kw: Any) -> None:
        kw.setdefault("cls", Group)
        super().__init__(rich_markup_mode=None, pretty_exceptions_enable=False, **kw)

    def command(self, *args: Any, cls: Any = None, **kw: Any) -> Any:
        return super().command(*args, cls=cls or Command, **kw)
