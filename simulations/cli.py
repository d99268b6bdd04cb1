"""The `leanfed` command line (typer): benchmarks, simulations, runs and reports."""

from __future__ import annotations

from typing import Annotated

import typer

from simulations.bench_centralized import register as register_centralized
from simulations.bench_continual import register as register_continual
from simulations.bench_federated import register as register_federated
from simulations.bench_privacy import register as register_privacy
from simulations.bench_robustness import register as register_robustness
from simulations.bench_scale import register as register_scale
from simulations.bench_speed import register as register_speed
from simulations.deploy import register as register_deploy
from simulations.edge import LeanfedGroup, new_app
from simulations.runs_cli import register as register_runs
from simulations.simulate import register as register_simulate

app = new_app(
    cls=LeanfedGroup,
    no_args_is_help=True,
    add_completion=False,
    help="leanfed: federated DST on Flower.",
)
bench_app = new_app(no_args_is_help=True, help="Benchmarks that write DIR/results.json.")
app.add_typer(bench_app, name="bench")
register_centralized(bench_app)
register_federated(bench_app)
register_continual(bench_app)
register_scale(bench_app)
register_speed(bench_app)
register_privacy(bench_app)
register_robustness(bench_app)
register_simulate(app)
register_runs(app)
register_deploy(app)


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
