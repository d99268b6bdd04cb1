"""The `leanfed` command line (typer): benchmarks, simulations, runs and reports."""

from __future__ import annotations

import typer

from simulations.bench_centralized import register as register_centralized
from simulations.bench_continual import register as register_continual
from simulations.bench_federated import register as register_federated
from simulations.deploy import register as register_deploy
from simulations.runs_cli import register as register_runs
from simulations.simulate import register as register_simulate

app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="leanfed: federated DST on Flower."
)
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that write DIR/results.json.")
app.add_typer(bench_app, name="bench")
register_centralized(bench_app)
register_federated(bench_app)
register_continual(bench_app)
register_simulate(app)
register_runs(app)
register_deploy(app)


if __name__ == "__main__":  # pragma: no cover
    app()
