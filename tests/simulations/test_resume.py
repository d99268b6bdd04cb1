"""Crash-safe resume: SIGKILL after round k, resume, match an uninterrupted run bit for bit."""

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

from server.store import RunStore

CONFIG = """
num-server-rounds = 12
dataset = "digits"
model = "mlp"
num-partitions = 4
min-train-nodes = 2
seed = 3
local.steps = 120
local.batch-size = 16
dst.density = 0.2
dst.rule = "rigl"
"""


def _simulate(args: list[str], cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "simulations.cli", "simulate", "--no-progress", *args],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONHASHSEED": "0"},
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


def _final_state(url: str) -> tuple[str, dict[str, torch.Tensor]]:
    with RunStore(url) as store:
        (run,) = store.list_runs()
        assert run.status == "completed", run.status
        latest = store.latest_checkpoint(run.id)
        assert latest is not None and latest[0] == 12
        return run.id, torch.load(io.BytesIO(latest[1]), weights_only=True)["state"]


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[2]
    conf = tmp_path / "tiny.toml"
    conf.write_text(CONFIG)

    ref_url = f"sqlite:///{tmp_path / 'ref.db'}"
    ref = _simulate(["--config", str(conf), "--db", ref_url], repo)
    assert ref.wait(timeout=300) == 0, ref.stderr.read().decode() if ref.stderr else ""
    _, reference = _final_state(ref_url)

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
    assert killed_after is not None and killed_after < 12, "the run ended before it could be killed"
    assert proc.returncode == -signal.SIGKILL

    with RunStore(url) as store:
        (run,) = store.list_runs()
        assert run.status == "running"  # a SIGKILL leaves no chance to mark it
        assert run.last_round is not None and 2 <= run.last_round < 12
        run_id = run.id

    resumed = _simulate(["--db", url, "--resume", run_id], repo)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode() if resumed.stderr else ""
    rid, state = _final_state(url)
    assert rid == run_id
    assert state.keys() == reference.keys()
    for k in reference:
        assert torch.equal(state[k], reference[k]), f"{k} differs after resume"
    with RunStore(url) as store:
        assert [r.round for r in store.get_rounds(run_id)] == list(range(1, 13))
