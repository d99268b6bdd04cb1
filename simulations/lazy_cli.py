"""Lazy command groups: `leanfed --help` lists commands without importing torch or Flower.

Every command module imports torch, Flower or scikit-learn at its top (seconds on a small
machine), so the root and ``bench`` groups name their commands with a static one-line help
and import a command's module only when that command runs or shows its own ``--help``
(the pattern of click's "lazily loading subcommands"). A test checks that each static help
matches the loaded command's, so the listing cannot drift from the code.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from difflib import get_close_matches
from typing import ClassVar

import click
import typer
from typer.core import TyperGroup

from simulations.edge import LeanfedGroup, new_app


@dataclass(frozen=True)
class LazySpec:
    """Where a command lives: ``module.register(app)`` adds it under ``name``."""

    module: str
    short_help: str


class _Placeholder(click.Command):
    """Stands in for a command in a help listing; never invoked (resolve_command swaps it)."""


def load_command(name: str, spec: LazySpec) -> click.Command:
    """Import ``spec.module`` and return the click command its ``register`` adds as ``name``."""
    if spec.module.startswith(":"):  # a nested lazy group defined in this module
        return _GROUPS[spec.module[1:]]()
    scratch = new_app()
    importlib.import_module(spec.module).register(scratch)
    group = typer.main.get_group(scratch)
    command = group.commands.get(name)
    if command is None:  # a wiring bug, not a user error
        raise LookupError(f"{spec.module}.register adds no command named {name!r}")
    return command


class _LazyMixin(TyperGroup):
    """A group whose ``LAZY`` commands are placeholders until one is resolved."""

    LAZY: ClassVar[dict[str, LazySpec]] = {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        loaded = super().list_commands(ctx)
        return loaded + [name for name in self.LAZY if name not in self.commands]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        spec = self.LAZY.get(cmd_name)
        if spec is None:
            return None
        return _Placeholder(cmd_name, short_help=spec.short_help, help=spec.short_help)

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        try:
            name, command, rest = super().resolve_command(ctx, args)
        except click.UsageError as exc:
            # Typer suggests only loaded commands; suggest the lazy ones as well.
            close = get_close_matches(args[0], self.list_commands(ctx)) if args else []
            if close and "Did you mean" not in exc.message:
                hint = exc.message.rstrip(".") + f". Did you mean {close[0]!r}?"
                raise click.UsageError(hint, exc.ctx) from None
            raise
        if isinstance(command, _Placeholder) and name is not None:
            command = load_command(name, self.LAZY[name])
            self.add_command(command, name)
        return name, command, rest


ROOT_COMMANDS: dict[str, LazySpec] = {
    "simulate": LazySpec(
        "simulations.simulate",
        "Run a federated DST simulation on embedded defaults, recorded in the run store.",
    ),
    "report": LazySpec(
        "simulations.runs_cli",
        "Write report.md and PNG plots (accuracy, loss, bytes, layer densities) for a run.",
    ),
    "export": LazySpec(
        "simulations.runs_cli",
        "Export the condensed global model, its mask and a model card from a run's checkpoint.",
    ),
    "bench": LazySpec(":bench", "Benchmarks that write DIR/results.json."),
    "runs": LazySpec("simulations.runs_cli", "Inspect stored runs."),
    "deploy": LazySpec(
        "simulations.deploy",
        "Keys, certificates, signed apps and site checks for a real deployment.",
    ),
}

BENCH_COMMANDS: dict[str, LazySpec] = {
    "centralized": LazySpec(
        "simulations.bench_centralized",
        "Dense vs static/SET/RigL/GMP on CNN (4 densities), transformer and GNN (0.2).",
    ),
    "federated": LazySpec(
        "simulations.bench_federated",
        "Flower FedAvg vs leanfed sparse/FedDST per task: accuracy, bytes, client/round time.",
    ),
    "continual": LazySpec(
        "simulations.bench_continual",
        "Federated Split-MNIST: leanfed vs FedAvg (naive, replay): ACC, BWT, FWT, FLOPs.",
    ),
    "scale": LazySpec(
        "simulations.bench_scale",
        "Round time, messages/s, start-up and memory of both engines at 100-10,000 clients.",
    ),
    "speed": LazySpec(
        "simulations.bench_speed",
        "Dense vs masked vs CSR vs condensed: latency, training round, accuracy.",
    ),
    "privacy": LazySpec(
        "simulations.bench_privacy",
        "Secure aggregation vs plaintext, and accuracy vs DP epsilon (sparse vs dense).",
    ),
    "robustness": LazySpec(
        "simulations.bench_robustness",
        "Final accuracy per merge rule with 0/1/2 Byzantine clients of 10, and fuzzing.",
    ),
}


class LazyRootGroup(_LazyMixin, LeanfedGroup):
    """The ``leanfed`` group: one-line errors (LeanfedGroup) and lazy commands."""

    LAZY = ROOT_COMMANDS


class LazyBenchGroup(_LazyMixin):
    """The ``leanfed bench`` group."""

    LAZY = BENCH_COMMANDS


def bench_group() -> click.Group:
    """The ``bench`` group, its benchmarks loaded on demand."""
    return LazyBenchGroup(
        name="bench", help=ROOT_COMMANDS["bench"].short_help, no_args_is_help=True
    )


_GROUPS: dict[str, Callable[[], click.Command]] = {"bench": bench_group}
