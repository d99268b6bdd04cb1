"""Server side of condensed training: sub-networks per capacity, scatter, mixed-width merge."""

from __future__ import annotations

import pytest
import torch

from strategies.aggregation.condensed import CondensedSparseFedAvg, node_subnet, scatter_reply
from strategies.aggregation.merge import ClientUpdate, masked_weighted_mean
from strategies.aggregation.wire import ReplyError
from strategies.sparse.subnet import condense_state
from strategies.sparse.units import Consumer, UnitGroup

# a: 4 units x 3 inputs (channel), b: 2 x 4 reads a's units (fan-in, a mask on the wire)
GROUPS = [UnitGroup("a.weight", ("a.bias",), (), (Consumer("b.weight"),))]
STRUCTURE = {"a.weight": "channel", "b.weight": "fanin"}


def _global() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    a = torch.tensor([[1.0, 0, 0], [4.0, 0, 0], [0, 0, 0], [2.0, 0, 0]])  # norms 1, 4, -, 2
    state = {
        "a.weight": a,
        "a.bias": torch.tensor([0.5, 0.5, 0.0, 0.5]),
        "b.weight": torch.ones(2, 4),
    }
    mask = {
        "a.weight": torch.tensor([True, True, False, True]).unsqueeze(1).expand(4, 3).clone(),
        "b.weight": torch.ones(2, 4, dtype=torch.bool),
    }
    state["a.weight"] = torch.where(mask["a.weight"], a + 0.1, torch.zeros_like(a))
    return state, mask


def test_sub_networks_per_capacity() -> None:
    state, mask = _global()
    full = node_subnet(GROUPS, STRUCTURE, state, mask, 1.0)
    small = node_subnet(GROUPS, STRUCTURE, state, mask, 0.5)
    assert full.keep["a.weight"].tolist() == [0, 1, 3]  # the alive units
    assert small.keep["a.weight"].tolist() == [1, 3]  # ceil(1.5) = 2 largest: norms 4, 2
    assert small.spec["a.weight"].shape == (2, 3) and small.spec["b.weight"].shape == (2, 2)
    assert small.spec["a.weight"].masked is False  # channel layer: no mask bits
    assert small.spec["b.weight"].masked is True
    assert set(small.small_mask) == {"b.weight"}


def test_mixed_width_merge_averages_each_coordinate_over_its_trainers() -> None:
    state, mask = _global()
    subs = {
        1: node_subnet(GROUPS, STRUCTURE, state, mask, 1.0),
        2: node_subnet(GROUPS, STRUCTURE, state, mask, 0.5),
    }
    fill = {1: 10.0, 2: 20.0}
    strategy = CondensedSparseFedAvg(unit_groups=GROUPS, structure=STRUCTURE)
    updates = []
    for node, sub in subs.items():
        small = condense_state(state, sub.plan)
        trained = {k: torch.full_like(v, fill[node]) for k, v in small.items()}
        values, m = scatter_reply(sub, trained, sub.small_mask, mask, state)
        updates.append(ClientUpdate(node, values, m, num_examples=node, metrics={"capacity": 0.5}))
    strategy._subnets = dict(subs)
    prepared = strategy._prepare(updates)
    assert prepared[1].mask["a.bias"].tolist() == [False, True, False, True]
    merged = masked_weighted_mean(prepared, state)
    # unit 0: node 1 only -> 10; units 1, 3: (1 * 10 + 2 * 20) / 3; unit 2: nobody -> previous
    want = torch.tensor([10.0, 50 / 3, 0.0, 50 / 3])
    assert torch.allclose(merged["a.bias"], want)
    assert torch.allclose(merged["a.weight"][:, 0], want)
    assert torch.allclose(merged["b.weight"][0], want.where(want != 0, torch.tensor(1.0)))
    assert strategy.capacity == {1: 0.5, 2: 0.5}


def test_scatter_refuses_a_reply_with_other_tensors() -> None:
    state, mask = _global()
    sub = node_subnet(GROUPS, STRUCTURE, state, mask, 1.0)
    with pytest.raises(ReplyError):
        scatter_reply(sub, {"a.weight": torch.zeros(3, 3)}, {}, mask, state)
