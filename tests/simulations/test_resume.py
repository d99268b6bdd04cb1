"""Crash-safe resume: SIGKILL after round k, resume, match an uninterrupted run bit for bit
(weights and the checkpoint SHA-256 that `runs show` prints)."""

from __future__ import annotations

import io
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from client.app import app as client_app
from server.session import run_recorded
from server.store import RunStore
from simulations.cli import app
from simulations.grid import InProcessGrid
from simulations.pool import torch_threads
from simulations.simulate import build_config

CONFIG = """
num-server-rounds = 6
dataset = "digits"
model = "mlp"
num-partitions = 4
min-train-nodes = 2
seed = 3
local.steps = 60
local.batch-size = 16
dst.density = 0.2
dst.rule = "rigl"
"""


def _simulate(args: list[str], cwd: Path, capture: bool = False) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "simulations.cli", "simulate", "--no-progress", *args],
        cwd=cwd,
        stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONHASHSEED": "0", "COLUMNS": "200"},
    )


def _last_round(path: Path) -> int | None:
    """Last committed round, read with plain sqlite3: cheap enough to poll every 10 ms."""
    if not path.exists():
        return None
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0.05) as con:
            row = con.execute("SELECT max(last_round) FROM runs").fetchone()
    except sqlite3.Error:  # schema not there yet, or the writer holds the lock
        return None
    return None if row is None or row[0] is None else int(row[0])


def _resume_in_process(db: str, run_id: str) -> str:
    """`leanfed simulate --resume` in this process, every client here: no interpreter start.

    The crash or interrupt must hit a real process; the resume only reads the store. One
    torch thread, as every pool worker has: the float results then match bit for bit the
    subprocess's (the embedded engine is bit-identical for 1 and 2 workers, test_grid).
    """
    args = ["simulate", "--no-progress", "--workers", "0", "--db", db, "--resume", run_id]
    with torch_threads(1):
        res = CliRunner(env={"COLUMNS": "200"}).invoke(app, args)
    assert res.exit_code == 0, res.output
    return res.output


def _uninterrupted(conf: Path) -> tuple[dict[str, torch.Tensor], tuple[int, str]]:
    """Final weights and (round, checkpoint SHA-256) of the run, uninterrupted, in this process."""
    cfg = build_config(conf, None, {})
    with torch_threads(1), RunStore("sqlite://") as ref:  # one thread: as _resume_in_process
        grid = InProcessGrid(client_app, cfg.num_partitions, run_config=cfg.to_run_config())
        ref_id, _ = run_recorded(grid, cfg, ref)
        latest, sha = ref.latest_checkpoint(ref_id), ref.checkpoint_sha256(ref_id)
        assert latest is not None and sha is not None
        return torch.load(io.BytesIO(latest[1]), weights_only=True)["state"], sha


def _final_state(url: str) -> tuple[str, dict[str, torch.Tensor], str]:
    with RunStore(url) as store:
        (run,) = store.list_runs()
        assert run.status == "completed", run.status
        latest = store.latest_checkpoint(run.id)
        sha = store.checkpoint_sha256(run.id)
        assert latest is not None and latest[0] == 6 and sha is not None
        return run.id, torch.load(io.BytesIO(latest[1]), weights_only=True)["state"], sha[1]


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[2]
    conf = tmp_path / "tiny.toml"
    conf.write_text(CONFIG)

    url = f"sqlite:///{tmp_path / 'crash.db'}"
    proc = _simulate(["--config", str(conf), "--db", url], repo)
    killed_after = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
        done = _last_round(tmp_path / "crash.db")
        if done is not None and done >= 2:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed_after = done
            break
    assert killed_after is not None and killed_after < 6, "the run ended before it could be killed"
    assert proc.returncode == -signal.SIGKILL

    with RunStore(url) as store:
        (run,) = store.list_runs()
        assert run.status == "running"  # a SIGKILL leaves no chance to mark it
        assert run.last_round is not None and 2 <= run.last_round < 6
        assert run.display_status == "stale"  # its process is gone: shown as such
        run_id = run.id

    _resume_in_process(url, run_id)
    rid, state, sha = _final_state(url)
    reference, ref_sha = _uninterrupted(conf)
    assert rid == run_id and (6, sha) == ref_sha  # `runs show` prints the uninterrupted run's SHA
    assert state.keys() == reference.keys()
    for k in reference:
        assert torch.equal(state[k], reference[k]), f"{k} differs after resume"
    with RunStore(url) as store:
        assert [r.round for r in store.get_rounds(run_id)] == list(range(1, 7))


@pytest.mark.slow
def test_ctrl_c_says_how_to_resume_and_resume_matches(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[2]
    conf = tmp_path / "c.toml"
    conf.write_text(CONFIG.replace("rounds = 6", "rounds = 3").replace("steps = 60", "steps = 25"))
    db = tmp_path / "runs.db"
    proc = _simulate(["--config", str(conf), "--db", str(db)], repo, capture=True)
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

    out = _resume_in_process(str(db), run.id)
    table_rounds = [line.split("│")[1].strip() for line in out.splitlines() if line.count("│") > 5]
    assert table_rounds[-3:] == ["1", "2", "3"]  # the summary includes the earlier rounds

    _, expected = _uninterrupted(conf)
    with RunStore(f"sqlite:///{db}", read_only=True) as store:
        assert store.get_run(run.id).status == "completed"
        assert store.checkpoint_sha256(run.id) == expected
