"""aggregation.average end to end: the real apps on the in-process Grid, with and without it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from client.app import app as client_app
from server.runner import build_strategy, model_average, run_federated
from simulations.grid import InProcessGrid
from tasks.config import ConfigError, LeanfedConfig
from tests.server.test_dp_inprocess import BASE as DP_BASE

# test_dp_inprocess's tiny run, one round longer, the mask re-voted every round
BASE = DP_BASE.replace(num_server_rounds=3, dst_end_round_fraction=1.0)


def _run(cfg: LeanfedConfig):  # type: ignore[no-untyped-def]
    grid = InProcessGrid(client_app, cfg.num_partitions, run_config=cfg.to_run_config())
    strategy = build_strategy(cfg)
    return run_federated(grid, cfg, strategy=strategy), strategy


@pytest.mark.parametrize("privacy", ["none", "record"])
def test_averaging_changes_only_the_served_model_and_keeps_its_density(privacy: str) -> None:
    base = dataclasses.replace(BASE, privacy_mode=privacy, privacy_noise_multiplier=1.0)
    plain, s_plain = _run(base)
    tail = dataclasses.replace(base, aggregation_average="tail", aggregation_average_rounds=2)
    avg, s_avg = _run(tail)
    # the clients train from the iterate: the same replies, bytes, losses and masks
    for a, b in zip(plain.rounds, avg.rounds, strict=True):
        assert (a.train_loss, a.upload_bytes, a.download_bytes) == (
            b.train_loss,
            b.upload_bytes,
            b.download_bytes,
        )
        assert a.density == b.density
    assert s_plain.mask is not None and s_avg.mask is not None
    assert all(torch.equal(s_plain.mask[k], s_avg.mask[k]) for k in s_plain.mask)
    assert plain.rounds[0].accuracy == avg.rounds[0].accuracy  # round 1 < the tail's start
    assert plain.final_state is not None and avg.final_state is not None
    # rounds 2 and 3 averaged: a different model, exactly on the final consensus mask
    assert any(not torch.equal(plain.final_state[k], avg.final_state[k]) for k in s_avg.mask)
    for k, m in s_avg.mask.items():
        assert torch.all(avg.final_state[k][~m] == 0)
        assert int((avg.final_state[k] != 0).sum()) == int(m.sum())


def test_tail_starts_average_rounds_before_the_end_and_resume_is_refused() -> None:
    cfg = BASE.replace(aggregation_average="tail", aggregation_average_rounds=2)
    average = model_average(cfg)
    assert average is not None and average.start == 2
    assert model_average(BASE) is None
    long_tail = model_average(cfg.replace(aggregation_average_rounds=9))
    assert long_tail is not None and long_tail.start == 1
    grid = InProcessGrid(client_app, cfg.num_partitions, run_config=cfg.to_run_config())
    with pytest.raises(ConfigError, match="cannot resume"):
        run_federated(grid, cfg, start_round=2)


def test_bad_average_keys_are_one_line_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"aggregation\.average"):
        BASE.replace(aggregation_average="polyak")
    with pytest.raises(ConfigError, match=r"aggregation\.average-decay"):
        BASE.replace(aggregation_average_decay=1.0)
    with pytest.raises(ConfigError, match=r"aggregation\.average-rounds"):
        BASE.replace(aggregation_average_rounds=0)
