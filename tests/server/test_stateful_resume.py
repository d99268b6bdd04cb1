"""A stateful rule (FedAdam) with a user model: its state rides in every checkpoint, and an
interrupted run resumed from the store ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from client.app import app as client_app
from server.runner import RoundRecord
from server.session import run_recorded
from server.store import RunStore
from simulations.grid import InProcessGrid
from tasks.config import LeanfedConfig

RUN = {
    "num-server-rounds": 4,
    "dataset": "digits",
    "model": "examples.my_plugins:tiny_net",
    "model.options.hidden": 16,
    "num-partitions": 4,
    "min-train-nodes": 2,
    "local.steps": 4,
    "local.batch-size": 16,
    "dst.density": 0.3,
    "aggregation.rule": "fedadam",
    "aggregation.options.eta": 0.01,
    "seed": 5,
}


def _run(url: str, cfg: LeanfedConfig, stop_after: int | None = None) -> str | None:
    def on_round(rec: RoundRecord) -> None:
        if rec.round == stop_after:
            raise KeyboardInterrupt

    grid = InProcessGrid(
        client_app, cfg.num_partitions, run_config=cfg.replace(resume="").to_run_config()
    )
    with RunStore(url) as store:
        try:
            run_id, _ = run_recorded(grid, cfg, store, on_round=on_round)
        except KeyboardInterrupt:
            return store.list_runs()[0].id
    return run_id


def _checkpoint(url: str, run_id: str) -> dict:
    with RunStore(url) as store:
        latest = store.latest_checkpoint(run_id)
        assert latest is not None and latest[0] == 4
        return torch.load(io.BytesIO(latest[1]), weights_only=True)


@pytest.mark.slow
def test_fedadam_resume_is_bit_identical(tmp_path: Path) -> None:
    cfg = LeanfedConfig.from_run_config(RUN)
    ref_url = f"sqlite:///{tmp_path / 'ref.db'}"
    ref = _checkpoint(ref_url, _run(ref_url, cfg) or "")
    assert set(ref["rule_state"]) == {"m", "v"} and ref["rule_state"]["m"]

    url = f"sqlite:///{tmp_path / 'crash.db'}"
    run_id = _run(url, cfg, stop_after=2)
    assert run_id is not None
    with RunStore(url) as store:
        assert store.get_run(run_id).status == "interrupted"
    _run(url, cfg.replace(resume=run_id))
    got = _checkpoint(url, run_id)
    for k, v in ref["state"].items():
        assert torch.equal(v, got["state"][k]), k
    for slot in ("m", "v"):
        for k, v in ref["rule_state"][slot].items():
            assert torch.equal(v, got["rule_state"][slot][k]), (slot, k)
