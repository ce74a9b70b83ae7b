"""What every ``tvq`` command group shares: the Typer app settings and the one-line errors."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console

from tvq.errors import TvqError

err_console = Console(stderr=True)


def new_app(name: str, help: str) -> typer.Typer:
    """A command group: no tracebacks, no shell-completion noise, help when called bare."""
    return typer.Typer(name=name, help=help, no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


def error_handler(interrupted: str, exit_codes: tuple[tuple[type[Exception], int], ...] = ()) -> Callable:
    """A decorator turning tvq's errors into one line on stderr and an exit code, never a
    traceback: the codes in ``exit_codes`` first (e.g. a missing data package -> 1), any
    other tvq error -> 2, Ctrl-C -> 130 with ``interrupted`` saying what was kept."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except TvqError as exc:
                code = next((c for kind, c in exit_codes if isinstance(exc, kind)), 2)
                err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
                raise typer.Exit(code) from None
            except KeyboardInterrupt:
                err_console.print(f"[bold red]interrupted[/]: {interrupted}")
                raise typer.Exit(130) from None

        return wrapper

    return decorate
