"""Replaying averaging variants on one run's iterates scores exactly what a real run serves."""

from __future__ import annotations

import pytest

from client.app import app as client_app
from server.runner import build_strategy, run_federated
from simulations.average_replay import AVERAGE_VARIANTS, IterateLog, replay
from simulations.grid import InProcessGrid
from tasks.config import LeanfedConfig
from tests.server.test_dp_inprocess import BASE as DP_BASE

# test_dp_inprocess's tiny run with record-level DP, 4 rounds, the mask re-voted every round
BASE = DP_BASE.replace(
    num_server_rounds=4,
    dst_end_round_fraction=1.0,
    privacy_mode="record",
    privacy_noise_multiplier=1.0,
    validation_size=100,
    seed=2,
)


def _grid(cfg: LeanfedConfig) -> InProcessGrid:
    return InProcessGrid(client_app, cfg.num_partitions, run_config=cfg.to_run_config())


def test_replay_equals_real_averaged_runs_round_by_round() -> None:
    log = IterateLog()
    plain = run_federated(_grid(BASE), BASE, strategy=build_strategy(BASE), on_round=log)
    scored = replay(BASE, log, AVERAGE_VARIANTS)
    assert set(scored) == set(AVERAGE_VARIANTS)
    assert scored["none"]["accuracy_per_round"] == [r.accuracy for r in plain.rounds]
    for name in ("ema0.8", "tail3"):
        cfg = BASE.replace(**AVERAGE_VARIANTS[name])
        real = run_federated(_grid(cfg), cfg, strategy=build_strategy(cfg))
        assert scored[name]["accuracy_per_round"] == [r.accuracy for r in real.rounds]
        assert scored[name]["final_accuracy"] == real.final_accuracy


def test_replay_refuses_an_averaged_run() -> None:
    with pytest.raises(ValueError, match="without aggregation.average"):
        replay(BASE.replace(aggregation_average="ema"), IterateLog(), {})
