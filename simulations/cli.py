"""The `leanfed` command line (typer): benchmarks, simulations, runs and reports."""

from __future__ import annotations

from typing import Annotated

import typer

from simulations.edge import new_app
from simulations.lazy_cli import LazyRootGroup

# Commands are imported only when one runs (simulations/lazy_cli.py): `leanfed --help`
# must answer without importing torch, Flower or scikit-learn.
app = new_app(
    cls=LazyRootGroup,
    no_args_is_help=True,
    add_completion=False,
    help="leanfed: federated DST on Flower.",
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"leanfed {version('leanfed')}")
        except PackageNotFoundError:  # running from a source tree that is not installed
            typer.echo("leanfed (not installed)")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print leanfed's version and exit.", is_eager=True, callback=_version
        ),
    ] = False,
    debug: Annotated[
        bool,
        typer.Option(
            "--debug", help="Show full tracebacks (they may quote your data) instead of one line."
        ),
    ] = False,
) -> None:
    """leanfed: federated DST on Flower."""
    # Read by LeanfedGroup.invoke from the context's params; nothing to do here.


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
