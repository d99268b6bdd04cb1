"""The CLI edge: every error a user or a site can cause becomes one line; tracebacks need --debug.

A traceback with locals can print a user's raw rows (a CSV line held in a local variable is
patient data in a terminal or log), so without ``--debug`` leanfed prints only the error's
one-line message, and for an unexpected exception only its type and where it was raised.
"""

from __future__ import annotations

from typing import Any

import click
import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

__all__ = ["LeanfedGroup", "new_app", "print_error"]


def print_error(message: str) -> None:
    """One red line on stderr; soft_wrap keeps it one line whatever the terminal width."""
    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"[bold red]error:[/] {escape(message)}", markup=True
    )


class LeanfedGroup(TyperGroup):
    """Typer's group, with leanfed's error classes caught where the command returns."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except Exception as exc:
            if ctx.params.get("debug"):
                raise
            # Imported here, not at the top: the error classes live in modules that import
            # torch, and `leanfed --help` must not (simulations/lazy_cli.py). A command that
            # raised has imported them already.
            from server.errors import USER_ERRORS, describe, first_line

            if isinstance(exc, USER_ERRORS):
                print_error(first_line(exc))
            else:
                # The message of an unexpected exception may quote data: type and place only.
                print_error(f"{describe(exc)} (a bug in leanfed?); rerun with --debug to see it")
            raise typer.Exit(1) from None


def new_app(**kwargs: Any) -> typer.Typer:
    """A Typer app that never prints local variables in a traceback."""
    return typer.Typer(pretty_exceptions_show_locals=False, **kwargs)
