"""Structured DST (dst.rule = channel / srigl) through the real ServerApp and ClientApp path."""

from __future__ import annotations

import pytest
import torch

from client.app import app as client_app
from server.runner import _dataset as runner_dataset
from server.runner import make_model, run_dataset, run_federated, sparse_init
from simulations.grid import InProcessGrid
from strategies.sparse.structured import check_structure
from tasks.config import ConfigError, LeanfedConfig
from tasks.structure import layer_kinds, unit_rows

CHANNEL = LeanfedConfig(
    num_server_rounds=3,
    dataset="digits",
    model="cnn",
    num_partitions=3,
    min_train_nodes=3,
    local_steps=4,
    local_batch_size=16,
    dst_rule="channel",
    dst_density=0.5,
    dst_distribution="uniform",
    dst_end_round_fraction=1.0,
    seed=3,
)


def _model(cfg: LeanfedConfig) -> torch.nn.Module:
    return make_model(cfg, run_dataset(cfg, runner_dataset))


def test_layer_kinds_of_the_cnn() -> None:
    kinds = layer_kinds(_model(CHANNEL), CHANNEL)
    assert kinds == {
        "conv1.weight": "channel",
        "conv2.weight": "channel",
        "fc1.weight": "channel",
        "fc2.weight": "fanin",  # the classifier declares no unit group
    }
    assert layer_kinds(_model(CHANNEL), CHANNEL.replace(dst_rule="rigl")) == {}
    srigl = layer_kinds(_model(CHANNEL), CHANNEL.replace(dst_rule="srigl"))
    assert set(srigl.values()) == {"fanin"}


def test_initial_server_mask_is_whole_units() -> None:
    mask = sparse_init(_model(CHANNEL), CHANNEL)
    # uniform 0.5: round(0.5 * units) whole units per channel layer
    alive = {k: int(m.reshape(m.shape[0], -1).all(1).sum()) for k, m in mask.items()}
    assert alive["conv1.weight"] == 8 and alive["conv2.weight"] == 16
    assert alive["fc1.weight"] == 64
    for k in ("conv1.weight", "conv2.weight", "fc1.weight"):
        check_structure(mask[k], "channel")
    check_structure(mask["fc2.weight"], "fanin")
    assert int(mask["fc2.weight"].sum(1)[0]) == 64  # fan-in round(0.5 * 128) in every row


@pytest.mark.parametrize("rule", ["channel", "srigl"])
def test_consensus_mask_stays_structured_over_rounds(rule: str) -> None:
    cfg = CHANNEL.replace(dst_rule=rule)
    masks: list[dict[str, torch.Tensor]] = []
    changed: list[int] = []

    def on_round(rec, strategy, arrays) -> None:  # noqa: ANN001 - the runner's callback
        masks.append({k: v.clone() for k, v in strategy.mask.items()})
        changed.append(int(rec.metrics.get("mask_changed", 0)))

    grid = InProcessGrid(client_app, cfg.num_partitions, run_config=cfg.to_run_config())
    summary = run_federated(grid, cfg, on_round=on_round)
    assert len(summary.rounds) == 3
    assert all(r.num_accepted == 3 for r in summary.rounds)  # structured replies validate
    assert sum(changed) >= 1  # the vote moved units: the structured path is live
    initial = sparse_init(_model(cfg), cfg)
    kinds = layer_kinds(_model(cfg), cfg)
    for mask in masks:
        for k, m in mask.items():
            check_structure(m, kinds[k])
            if kinds[k] == "channel":  # exactly as many whole units as the initial mask
                rows = m.reshape(m.shape[0], -1)
                want = int(initial[k].reshape(m.shape[0], -1).all(1).sum())
                assert int(rows.all(1).sum()) == want
                assert int(m.sum()) == want * rows.shape[1]
            else:  # constant fan-in: the initial k per active unit (no ablation in fc2)
                assert set(m.sum(1)[m.sum(1) > 0].tolist()) == {64} or rule == "srigl"
    state = summary.final_state
    assert state is not None
    final = masks[-1]
    for k in ("conv1", "conv2", "fc1"):  # dead units are exactly zero, bias included
        dead = ~final[f"{k}.weight"].reshape(final[f"{k}.weight"].shape[0], -1).any(1)
        assert bool((state[f"{k}.weight"][dead] == 0).all())


def test_structured_rule_needs_the_weighted_vote() -> None:
    with pytest.raises(ConfigError, match="aggregation.vote"):
        CHANNEL.replace(aggregation_vote="robust").validate()
    with pytest.raises(ConfigError, match="dst.condensed"):
        CHANNEL.replace(dst_rule="rigl", dst_condensed=True).validate()
    with pytest.raises(ConfigError, match="privacy.mode"):
        CHANNEL.replace(dst_condensed=True, privacy_mode="record").validate()


def test_transformer_consensus_keeps_whole_heads() -> None:
    cfg = CHANNEL.replace(model="transformer", num_partitions=2, min_train_nodes=2, local_steps=2)
    model = _model(cfg)
    rows = unit_rows(model, cfg)
    assert set(rows) == {f"encoder.layers.{i}.self_attn.in_proj_weight" for i in range(2)}
    assert tuple(rows["encoder.layers.0.self_attn.in_proj_weight"].shape) == (4, 48)  # 4 heads
    masks: list[dict[str, torch.Tensor]] = [sparse_init(model, cfg)]
    grid = InProcessGrid(client_app, cfg.num_partitions, run_config=cfg.to_run_config())
    run_federated(grid, cfg, on_round=lambda rec, st, arrays: masks.append(dict(st.mask)))
    for mask in masks:
        for key, idx in rows.items():
            per_head = mask[key].reshape(mask[key].shape[0], -1)[idx.reshape(-1)]
            per_head = per_head.reshape(idx.shape[0], -1)  # [heads, 48 rows * 64 inputs]
            assert bool((per_head.all(1) | ~per_head.any(1)).all())  # whole heads only
            assert int(per_head.all(1).sum()) == 2  # round(0.5 * 4) heads every round
