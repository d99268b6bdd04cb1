"""Ctrl-C on `leanfed simulate`: the run is stored as interrupted, the CLI says how to resume,
and the resumed run reports every round and ends at the SHA-256 of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from server.session import run_recorded
from server.store import RunStore
from simulations.cli import app
from simulations.grid import InProcessGrid
from simulations.simulate import build_config

CONFIG = """
num-server-rounds = 3
dataset = "digits"
model = "mlp"
num-partitions = 4
min-train-nodes = 2
seed = 7
local.steps = 25
local.batch-size = 16
dst.density = 0.2
"""


def _simulate(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "simulations.cli", "simulate", "--no-progress", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )


def _last_round(path: Path) -> int | None:
    if not path.exists():
        return None
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0.05) as con:
            row = con.execute("SELECT max(last_round) FROM runs").fetchone()
    except sqlite3.Error:
        return None
    return None if row is None or row[0] is None else int(row[0])


@pytest.mark.slow
def test_ctrl_c_says_how_to_resume_and_resume_matches(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[2]
    conf = tmp_path / "c.toml"
    conf.write_text(CONFIG)
    db = tmp_path / "runs.db"
    proc = _simulate(["--config", str(conf), "--db", str(db)], repo)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
        if (_last_round(db) or 0) >= 1:
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    with RunStore(f"sqlite:///{db}", read_only=True) as store:
        (run,) = store.list_runs()
    assert run.status == "interrupted" and run.last_round is not None and run.last_round < 3
    assert (
        f"stopped after round {run.last_round}; resume with `leanfed simulate --resume {run.id}`"
        in err
    )
    assert "Traceback" not in err
    show = CliRunner(env={"COLUMNS": "250"}).invoke(app, ["runs", "show", run.id, "--db", str(db)])
    assert f"interrupted; resume with `leanfed simulate --resume {run.id}`" in show.output

    resumed = _simulate(["--db", str(db), "--resume", run.id], repo)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    table_rounds = [line.split("│")[1].strip() for line in out.splitlines() if line.count("│") > 5]
    assert table_rounds[-3:] == ["1", "2", "3"]  # the summary includes the earlier rounds

    cfg = build_config(conf, None, {})  # the same run, uninterrupted, in this process
    with RunStore("sqlite://") as ref:
        ref_id, _ = run_recorded(
            InProcessGrid(
                __import__("client.app", fromlist=["app"]).app,
                cfg.num_partitions,
                run_config=cfg.to_run_config(),
            ),
            cfg,
            ref,
        )
        expected = ref.checkpoint_sha256(ref_id)
    with RunStore(f"sqlite:///{db}", read_only=True) as store:
        assert store.get_run(run.id).status == "completed"
        assert store.checkpoint_sha256(run.id) == expected
