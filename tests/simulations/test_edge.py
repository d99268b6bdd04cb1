"""The CLI edge: user-caused errors are one line that never quotes data; --debug re-raises."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from simulations.cli import app
from tasks.config import ConfigError

MARKER = "PATIENT-4711-SECRET"


def _conf(tmp_path: Path, dataset: str) -> Path:
    conf = tmp_path / "c.toml"
    conf.write_text(
        f'num-server-rounds = 1\ndataset = "{dataset}"\nmodel = "mlp"\n'
        "num-partitions = 2\nmin-train-nodes = 1\n"
    )
    return conf


@pytest.mark.parametrize(
    "text",
    [
        f"age,weight,label\n51,70,0\n{MARKER},81,1\n44,60,1\n",  # non-numeric cell
        f"{MARKER},70,0\n51,80,1\n44,60,1\n",  # no header row: the first row is data
        f"age,label\n51,0\n{MARKER}\n",  # ragged row
        "age,label\n51,0.5\n62,1\n",  # non-integer label
    ],
)
def test_malformed_csv_rows_never_reach_the_output(tmp_path: Path, text: str) -> None:
    csv = tmp_path / "site.csv"
    csv.write_text(text)
    conf = _conf(tmp_path, f"csv:{csv}")
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    res = CliRunner().invoke(app, ["simulate", "--no-progress", "--config", str(conf), "--db", db])
    assert res.exit_code == 1
    out = res.output
    assert MARKER not in out and "51" not in out.replace(str(tmp_path), "")
    assert "Traceback" not in out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "site.csv" in lines[0]


def test_debug_flag_re_raises_with_the_traceback(tmp_path: Path) -> None:
    conf = _conf(tmp_path, "no-such-set")
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    args = ["simulate", "--no-progress", "--config", str(conf), "--db", db]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1 and "dataset = 'no-such-set': unknown dataset" in res.output
    res = CliRunner().invoke(app, ["--debug", *args])
    assert isinstance(res.exception, ConfigError)  # the unknown name, re-raised


def test_garbage_database_url_is_one_line_without_the_password() -> None:
    res = CliRunner().invoke(app, ["runs", "list", "--db", "postgresql://u:hunter2@h:port/db"])
    assert res.exit_code == 1
    assert "hunter2" not in res.output and res.output.count("\n") == 1
    assert res.output.startswith("error: invalid database URL")


def test_no_typer_app_prints_locals() -> None:
    from simulations.deploy import deploy_app
    from simulations.runs_cli import runs_app

    for typer_app in (app, deploy_app, runs_app):
        assert typer_app.pretty_exceptions_show_locals is False
