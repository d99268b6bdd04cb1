"""The CLI edge: every error a user or a site can cause becomes one line; tracebacks need --debug.

A traceback with locals can print a user's raw rows (a CSV line held in a local variable is
patient data in a terminal or log), so without ``--debug`` leanfed prints only the error's
one-line message, and for an unexpected exception only its type and where it was raised.
"""

from __future__ import annotations

import traceback
from typing import Any

import click
import typer
from rich.console import Console
from typer.core import TyperGroup

from server.security.errors import DeployError
from server.store.errors import StoreError
from strategies.codec import CodecError
from strategies.sparse.masks import MaskError
from tasks.config import ConfigError
from tasks.datasets import DatasetError
from tasks.models import ModelError
from tasks.stream import StreamError

# leanfed's own error classes: their messages are written to name what was wrong, never data.
USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    DatasetError,
    ModelError,
    StreamError,
    MaskError,
    CodecError,
    StoreError,
    DeployError,
)


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name when empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def print_error(message: str) -> None:
    """One red line on stderr; soft_wrap keeps it one line whatever the terminal width."""
    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"[bold red]error:[/] {message}", markup=True
    )


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "unknown location"
    last = frames[-1]
    return f"{last.filename.rsplit('/', 1)[-1]}:{last.lineno} in {last.name}"


class LeanfedGroup(TyperGroup):
    """Typer's group, with leanfed's error classes caught where the command returns."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except USER_ERRORS as exc:
            if ctx.params.get("debug"):
                raise
            print_error(first_line(exc))
            raise typer.Exit(1) from None
        except Exception as exc:
            if ctx.params.get("debug"):
                raise
            # The message of an unexpected exception may quote data: show type and place only.
            print_error(
                f"unexpected {type(exc).__name__} at {_where(exc)} (a bug in leanfed?); "
                "rerun with --debug for the traceback"
            )
            raise typer.Exit(1) from None


def new_app(**kwargs: Any) -> typer.Typer:
    """A Typer app that never prints local variables in a traceback."""
    return typer.Typer(pretty_exceptions_show_locals=False, **kwargs)
