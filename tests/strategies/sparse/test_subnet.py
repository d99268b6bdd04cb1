"""Sub-networks: which units a capacity gets, slicing and scattering, the shrunk module."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from strategies.sparse.condense import condense
from strategies.sparse.masks import apply_mask
from strategies.sparse.subnet import (
    choose_units,
    condense_state,
    coverage,
    expand_state,
    shrink_module,
    slice_plan,
)
from strategies.sparse.units import Consumer, UnitGroup, unit_groups, zero_dead_shifts
from tasks.models import SmallCNN

GROUP = UnitGroup("a.weight", ("a.bias",), (), (Consumer("b.weight"),))


def _state() -> dict[str, torch.Tensor]:
    norms = torch.tensor([3.0, 0.0, 5.0, 1.0, 4.0, 2.0])  # row L2 norms (row 1 dead)
    a = torch.zeros(6, 2)
    a[:, 0] = norms
    return {"a.weight": a, "a.bias": torch.arange(6.0), "b.weight": torch.ones(2, 6)}


def test_choose_units_by_consensus_magnitude_not_prefix() -> None:
    state = _state()
    mask = {"a.weight": state["a.weight"] != 0}
    mask["a.weight"][:, 1] = mask["a.weight"][:, 0]  # whole rows
    pick = {c: choose_units([GROUP], mask, state, c)["a.weight"].tolist() for c in (1.0, 0.5)}
    assert pick[1.0] == [0, 2, 3, 4, 5]  # the 5 alive units
    assert pick[0.5] == [0, 2, 4]  # ceil(2.5) = 3 largest norms: 5, 4, 3
    assert choose_units([GROUP], mask, state, 0.25)["a.weight"].tolist() == [2, 4]
    assert choose_units([GROUP], mask, state, 0.01)["a.weight"].tolist() == [2]
    none = {"a.weight": torch.zeros(6, 2, dtype=torch.bool)}
    assert choose_units([GROUP], none, state, 1.0)["a.weight"].tolist() == [0]
    with pytest.raises(ValueError, match="capacity"):
        choose_units([GROUP], mask, state, 0.0)


def test_slice_expand_and_coverage_are_exact() -> None:
    state = _state()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    plan = slice_plan([GROUP], shapes, {"a.weight": torch.tensor([0, 2, 4])})
    small = condense_state(state, plan)
    assert small["a.weight"].shape == (3, 2) and small["b.weight"].shape == (2, 3)
    assert small["a.bias"].tolist() == [0.0, 2.0, 4.0]
    template = {k: torch.full_like(v, -1.0) for k, v in state.items()}
    back = expand_state(small, plan, shapes, template)
    assert back["a.bias"].tolist() == [0.0, -1.0, 2.0, -1.0, 4.0, -1.0]
    assert (
        back["b.weight"][:, [0, 2, 4]].eq(1).all() and back["b.weight"][:, [1, 3, 5]].eq(-1).all()
    )
    cover = coverage(plan, shapes)
    assert int(cover["a.weight"].sum()) == 6 and int(cover["b.weight"].sum()) == 6
    assert cover["a.bias"].tolist() == [True, False, True, False, True, False]


def test_shrunk_module_computes_the_masked_model() -> None:
    torch.manual_seed(0)
    model = SmallCNN((1, 8, 8), 10)
    mask = {
        n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters() if p.dim() > 1
    }
    dead = {
        "conv1.weight": [1, 5, 9],
        "conv2.weight": [0, 3, 4, 30],
        "fc1.weight": list(range(0, 128, 3)),
    }
    for name, rows in dead.items():
        mask[name][rows] = False
    apply_mask(model, mask)
    groups = unit_groups(model)
    zero_dead_shifts(model, mask, groups)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    keep = choose_units(groups, mask, state, 1.0)
    assert len(keep["conv2.weight"]) == 28
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    small = shrink_module(copy.deepcopy(model), slice_plan(groups, shapes, keep))
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), atol=1e-5)
        assert torch.allclose(small(x), condense(model, mask)(x), atol=1e-5)
    assert small.conv2.out_channels == 28 and small.fc1.in_features == 28 * 4


@given(
    st.lists(st.booleans(), min_size=6, max_size=6),
    st.lists(st.booleans(), min_size=4, max_size=4),
    st.floats(0.05, 1.0),
)
def test_slice_then_scatter_is_the_identity_on_kept_entries(
    keep_a: list[bool], keep_b: list[bool], capacity: float
) -> None:
    # a -> b -> c chain: a's 6 units feed b's columns, b's 4 units (2 rows each) feed c
    groups = [
        UnitGroup("a.weight", ("a.bias",), (), (Consumer("b.weight"),)),
        UnitGroup("b.weight", (), (), (Consumer("c.weight"),), rows_per_unit=2),
    ]
    gen = torch.Generator().manual_seed(0)
    state = {
        "a.weight": torch.randn(6, 3, generator=gen),
        "a.bias": torch.randn(6, generator=gen),
        "b.weight": torch.randn(8, 6, generator=gen),
        "c.weight": torch.randn(2, 4, generator=gen),
    }
    mask = {
        "a.weight": torch.tensor(keep_a).unsqueeze(1).expand(6, 3).clone(),
        "b.weight": torch.tensor(keep_b).repeat_interleave(2).unsqueeze(1).expand(8, 6).clone(),
    }
    keep = choose_units(groups, mask, state, capacity)
    alive = {"a.weight": sum(keep_a), "b.weight": sum(keep_b)}
    for name, idx in keep.items():
        assert bool((idx[1:] > idx[:-1]).all())  # sorted, unique
        want = max(1, math.ceil(capacity * alive[name] - 1e-9)) if alive[name] else 1
        assert idx.numel() == want
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    plan = slice_plan(groups, shapes, keep)
    small = condense_state(state, plan)
    assert small["b.weight"].shape == (2 * len(keep["b.weight"]), len(keep["a.weight"]))
    assert small["c.weight"].shape == (2, len(keep["b.weight"]))
    back = expand_state(small, plan, shapes, state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    zeros = expand_state(small, plan, shapes)
    cover = coverage(plan, shapes)
    for k in plan:
        assert int(cover[k].sum()) == small[k].numel()
        assert torch.equal(zeros[k][cover[k]], state[k][cover[k]])
        assert bool((zeros[k][~cover[k]] == 0).all())
