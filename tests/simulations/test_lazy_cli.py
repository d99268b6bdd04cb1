"""`leanfed --help` imports no heavy library, and the lazy listing matches the real commands."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
from typer.testing import CliRunner

from simulations.cli import app
from simulations.lazy_cli import BENCH_COMMANDS, ROOT_COMMANDS, LazySpec, load_command

HEAVY = ("torch", "flwr", "sklearn", "numpy", "ray", "sqlalchemy", "matplotlib")

PROBE = """
import sys
from typer.testing import CliRunner
from simulations.cli import app
result = CliRunner().invoke(app, {args!r})
assert result.exit_code == 0, result.output
print(",".join(m for m in {heavy!r} if m in sys.modules))
"""


@pytest.mark.parametrize("args", [["--help"], ["bench", "--help"], ["--version"]])
def test_help_imports_no_heavy_library(args: list[str]) -> None:
    # A fresh interpreter: this test process has imported torch long ago.
    probe = PROBE.format(args=args, heavy=HEAVY)
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == ""


def test_root_help_lists_every_command_in_order() -> None:
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    lines = [ln for ln in result.output.splitlines() if ln.startswith("│ ")]
    listed = [ln.split()[1] for ln in lines if ln.split()[1] in ROOT_COMMANDS]
    assert listed == list(ROOT_COMMANDS)


@pytest.mark.parametrize(
    ("name", "spec"),
    [*ROOT_COMMANDS.items(), *BENCH_COMMANDS.items()],
    ids=[*ROOT_COMMANDS, *(f"bench-{n}" for n in BENCH_COMMANDS)],
)
def test_static_help_matches_the_loaded_command(name: str, spec: LazySpec) -> None:
    command = load_command(name, spec)
    assert command.name == name
    real = command.short_help or (command.help or "").strip().splitlines()[0]
    assert real == spec.short_help


def test_bench_subcommand_loads_and_runs_its_own_help() -> None:
    result = CliRunner().invoke(app, ["bench", "speed", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "--quick" in result.output


def test_unknown_command_is_a_usage_error() -> None:
    result = CliRunner().invoke(app, ["simulat"])
    assert result.exit_code == 2
    assert "No such command" in result.output and "Did you mean 'simulate'" in result.output


def test_loading_a_name_the_module_does_not_add_is_a_wiring_error() -> None:
    with pytest.raises(LookupError, match="no command named 'nope'"):
        load_command("nope", LazySpec("simulations.deploy", "x"))
    assert isinstance(load_command("deploy", ROOT_COMMANDS["deploy"]), click.Group)
