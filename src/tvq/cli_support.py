"""What every ``tvq`` command group shares: the Typer app settings and the one-line errors."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import typer
from rich.console import Console
from rich.text import Text

from tvq.errors import ConfigError, TvqError
from tvq.io.layouts import FINETUNED_FILE
from tvq.io.signals import Terminated

# Markup off: what tvq prints holds user text (paths, task and tensor names) that must show
# literally (`--out "packs/[x]"` is not a style); styles are applied as Text styles instead.
console = Console(markup=False, highlight=False)
err_console = Console(stderr=True, markup=False, highlight=False)
DEBUG_ENV = "TVQ_DEBUG"


def new_app(name: str, help: str) -> typer.Typer:
    """A command group: no tracebacks, no shell-completion noise, help when called bare."""
    return typer.Typer(name=name, help=help, no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


def print_line(label: str, text: str) -> None:
    """One line on stderr: ``label: text`` with the text shown literally (no markup), unwrapped."""
    err_console.print(Text.assemble((f"{label}:", "bold red"), " ", text), soft_wrap=True)


def os_error_text(exc: OSError) -> str:
    """``file: reason`` for an OS error (disk full, permission denied, not a directory...)."""
    reason = exc.strerror or str(exc)
    return f"{exc.filename}: {reason}" if exc.filename is not None else reason


def debugging() -> bool:
    """TVQ_DEBUG=1: let unexpected errors through with their traceback."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def error_handler(interrupted: str, exit_codes: tuple[tuple[type[Exception], int], ...] = ()) -> Callable:
    """A decorator turning every failure into one line on stderr and a non-zero exit code,
    never a traceback: the codes in ``exit_codes`` first (e.g. a missing data package -> 1),
    any other tvq error or OS error -> 2, Ctrl-C -> 130 and SIGTERM/SIGHUP -> 128 + signal
    with ``interrupted`` saying what was kept, and anything else (a bug) -> 1."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except TvqError as exc:
                code = next((c for kind, c in exit_codes if isinstance(exc, kind)), 2)
                print_line("error", str(exc))
                raise typer.Exit(code) from None
            except KeyboardInterrupt:
                print_line("interrupted", interrupted)
                raise typer.Exit(130) from None
            except Terminated as exc:
                print_line("terminated", interrupted)
                raise typer.Exit(exc.exit_code) from None
            except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
                raise  # typer's own exits and usage errors
            except OSError as exc:
                if debugging():
                    raise
                print_line("error", os_error_text(exc))
                raise typer.Exit(2) from None
            except Exception as exc:
                if debugging():
                    raise
                print_line("error", f"internal error: {type(exc).__name__}: {exc} (please report; {DEBUG_ENV}=1 shows the traceback)")
                raise typer.Exit(1) from None

        return wrapper

    return decorate


def parse_named_paths(items: list[str], option: str = "--finetuned") -> dict[str, Path]:
    """``NAME=PATH`` pairs. A bare PATH is named after its file or folder, and the paper's
    ``<Task>/finetuned.pt`` after its task folder."""
    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            bare = Path(item)
            official = bare.name == FINETUNED_FILE and bare.parent.name not in ("", ".", "..")
            path, name = item, bare.parent.name if official else bare.stem if bare.is_file() else bare.name
        if not name or not path:
            raise ConfigError(f"{option} {item!r}: expected NAME=PATH")
        if name in out:
            raise ConfigError(f"{option}: task name {name!r} given twice")
        out[name] = Path(path)
    return out
