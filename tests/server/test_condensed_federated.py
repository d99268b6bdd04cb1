"""Condensed client training end to end: same maths as masked-dense, fewer bytes, mixed widths."""

from __future__ import annotations

import pytest
import torch

from client.app import app as client_app
from server.runner import _dataset as runner_dataset
from server.runner import make_model, run_dataset, run_federated, sparse_init
from simulations.grid import InProcessGrid
from strategies import codec
from strategies.aggregation.condensed import node_subnet
from strategies.codec_units import encode_units
from strategies.sparse.subnet import condense_state
from strategies.sparse.units import unit_groups
from tasks.config import LeanfedConfig
from tasks.structure import layer_kinds

BASE = LeanfedConfig(
    num_server_rounds=1,
    dataset="digits",
    model="cnn",
    num_partitions=3,
    min_train_nodes=3,
    fraction_evaluate=0.0,
    local_steps=3,
    local_batch_size=16,
    local_weight_decay=0.0,  # a dead unit's reader columns then stay put in both paths
    dst_rule="channel",
    dst_density=0.5,
    dst_distribution="uniform",
    dst_mask_round_interval=2,  # round 1 is not a mask round: condensed
    dst_end_round_fraction=1.0,
    seed=5,
)


def _run(cfg: LeanfedConfig, capacities: list[float] | None = None) -> tuple[object, list]:
    seen: list = []

    def on_round(rec, strategy, arrays) -> None:  # noqa: ANN001 - the runner's callback
        seen.append((rec, strategy))

    grid = InProcessGrid(
        client_app, cfg.num_partitions, run_config=cfg.to_run_config(), capacities=capacities
    )
    return run_federated(grid, cfg, on_round=on_round), seen


def _initial(cfg: LeanfedConfig) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    model = make_model(cfg, run_dataset(cfg, runner_dataset))
    return model, sparse_init(model, cfg)


def test_condensed_round_equals_the_masked_dense_round() -> None:
    dense_sum, dense_seen = _run(BASE)
    cond_sum, cond_seen = _run(BASE.replace(dst_condensed=True))
    a, b = dense_sum.final_state, cond_sum.final_state  # type: ignore[attr-defined]
    assert a is not None and b is not None and set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    assert cond_seen[0][0].num_accepted == 3
    assert cond_seen[0][0].download_bytes < dense_seen[0][0].download_bytes
    assert cond_seen[0][0].upload_bytes < dense_seen[0][0].upload_bytes


def test_condensed_bytes_are_the_sub_network_exactly() -> None:
    cfg = BASE.replace(dst_condensed=True)
    model, mask = _initial(cfg)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    sub = node_subnet(unit_groups(model), layer_kinds(model, cfg), state, mask)
    # 8 of 16, 16 of 32, 64 of 128 units; indices < 128 are one varint byte each:
    # 12 header + (1 + 12 + 1 + 8) + (1 + 12 + 1 + 16) + (1 + 10 + 1 + 64)
    assert {k: len(v) for k, v in sub.keep.items()} == {
        "conv1.weight": 8,
        "conv2.weight": 16,
        "fc1.weight": 64,
    }
    units = encode_units(sub.keep)
    assert len(units) == 140
    small = condense_state(state, sub.plan)
    assert tuple(small["fc1.weight"].shape) == (64, 16 * 4)  # 16 channels x 2x2 spatial
    assert set(sub.small_mask) == {"fc2.weight"}  # channel layers carry no mask bits
    down = len(codec.encode(small, sub.small_mask, send_mask=True)) + len(units)
    zeros = {k: torch.zeros_like(v) for k, v in small.items()}
    up = len(codec.encode(zeros, sub.small_mask, send_mask=False))  # fp32: size by shape
    summary, seen = _run(cfg)
    rec = seen[0][0]
    assert rec.download_bytes == 3 * down
    assert rec.upload_bytes == 3 * up
    # Values on the wire: the dense payload holds every active weight and every bias; the
    # condensed one drops the 88 dead units' biases, the reading columns of dead units in
    # alive rows (conv2: 16 rows x 8 dead inputs x 3x3; fc1: 64 rows x 16 dead channels x
    # 2x2 spatial) and fc2's active entries in dead fc1 columns.
    dead_fc1 = ~mask["fc1.weight"].any(1)
    fc2_dead = int(mask["fc2.weight"][:, dead_fc1].sum())
    full_values = sum(int(m.sum()) for m in mask.values()) + sum(
        v.numel() for k, v in state.items() if k not in mask
    )
    small_values = sum(
        int(sub.small_mask[k].sum()) if k in sub.small_mask else v.numel() for k, v in small.items()
    )
    assert full_values - small_values == 88 + 16 * 8 * 9 + 64 * 16 * 4 + fc2_dead


def test_mixed_capacity_nodes_get_their_width() -> None:
    cfg = BASE.replace(dst_condensed=True, num_server_rounds=3, dst_mask_round_interval=5)
    summary, seen = _run(cfg, capacities=[1.0, 0.25, 0.25])
    strategy = seen[-1][1]
    # Capacity is reported with the first reply and used from the node's next round on.
    assert sorted(strategy.capacity.values()) == [0.25, 0.25, 1.0]
    assert all(rec.num_accepted == 3 for rec, _ in seen)
    # Round 1: everyone at full width; rounds 2-3: two nodes get a quarter of the units.
    assert seen[1][0].download_bytes < seen[0][0].download_bytes
    state = summary.final_state
    assert state is not None and all(bool(torch.isfinite(v.float()).all()) for v in state.values())


@pytest.mark.parametrize("model", ["mlp", "gnn"])
def test_condensed_equals_masked_dense_on_other_models(model: str) -> None:
    cfg = BASE.replace(model=model, num_partitions=2, min_train_nodes=2, local_steps=2)
    dense_sum, dense_seen = _run(cfg)
    cond_sum, cond_seen = _run(cfg.replace(dst_condensed=True))
    a, b = dense_sum.final_state, cond_sum.final_state  # type: ignore[attr-defined]
    assert a is not None and b is not None
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    assert cond_seen[0][0].upload_bytes < dense_seen[0][0].upload_bytes


def test_condensed_transformer_trains_fewer_heads_and_width() -> None:
    # Dropout draws differ with the width, so only acceptance and bytes are compared here.
    cfg = BASE.replace(model="transformer", num_partitions=2, min_train_nodes=2, local_steps=2)
    _, dense_seen = _run(cfg)
    _, cond_seen = _run(cfg.replace(dst_condensed=True), capacities=[1.0, 0.5])
    assert cond_seen[0][0].num_accepted == 2
    assert cond_seen[0][0].upload_bytes < dense_seen[0][0].upload_bytes
