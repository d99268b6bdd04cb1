"""`leanfed simulate` reports a run that did not complete once, and never runs it again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, Message

import simulations.simulate as simulate_module
from client.app import app as client_app
from server.store import RunStore
from simulations.simulate import simulate
from tasks.config import LeanfedConfig

TINY = LeanfedConfig(
    num_server_rounds=1,
    dataset="digits",
    model="mlp",
    num_partitions=3,
    fraction_train=1.0,
    min_train_nodes=3,
    min_accepted_replies=3,
    local_steps=2,
)


def _site_0_down(message: Message, context: Context) -> Message:
    """The real ClientApp, except that partition 0 fails every train call."""
    if message.metadata.message_type == "train" and int(context.node_config["partition-id"]) == 0:
        raise RuntimeError("site down")
    return client_app(message, context)


def test_degraded_run_is_reported_once_and_not_run_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = simulate_module.InProcessGrid

    def grid(_app: str, num_nodes: int, run_config: Any, workers: int) -> Any:
        return real(_site_0_down, num_nodes, run_config=run_config, workers=workers)

    monkeypatch.setattr(simulate_module, "InProcessGrid", grid)
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    run_id = simulate(TINY, url, progress=False, workers=0)
    with RunStore(url) as store:
        assert [r.id for r in store.list_runs()] == [run_id]  # one run, not a second attempt
        assert store.get_run(run_id).status == "degraded"
    captured = capsys.readouterr()
    assert captured.out.count(f"run {run_id}") == 1  # one results table
    assert "run degraded: 1 of 1 rounds had fewer than 3 accepted replies" in captured.err
