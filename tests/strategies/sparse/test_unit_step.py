"""One unit's prune/grow step keeps its active count, never drops protected entries; state reset."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.sparse.prune_grow import LayerState, get_drop_rule, get_grow_rule
from strategies.sparse.unit_step import prune_grow_unit, reset_optimizer_state


@settings(max_examples=40, deadline=None)
@given(
    bits=st.lists(st.booleans(), min_size=4, max_size=24),
    seed=st.integers(0, 2**16),
    fraction=st.floats(0.0, 1.0),
    protect=st.booleans(),
)
def test_prune_grow_unit_invariants(
    bits: list[bool], seed: int, fraction: float, protect: bool
) -> None:
    gen = torch.Generator().manual_seed(seed)
    m = torch.tensor(bits)
    w = torch.randn(len(bits), generator=gen) * m
    pr = (torch.rand(len(bits), generator=gen) < 0.5) & m if protect else None
    layer = LayerState("w", w, m, None, gen)
    moved = prune_grow_unit(
        layer, fraction, pr, get_drop_rule("magnitude"), get_grow_rule("random")
    )
    active = int(m.sum())
    droppable = active if pr is None else int((m & ~pr).sum())
    k = min(round(fraction * active), droppable, m.numel() - active)
    if moved is None:
        assert k <= 0
        return
    dropped, grown = moved
    assert int(dropped.sum()) == int(grown.sum()) == k
    assert not bool((dropped & ~m).any()) and not bool((grown & m).any())
    assert int(((m & ~dropped) | grown).sum()) == active
    if pr is not None:
        assert not bool((dropped & pr).any())


def test_reset_optimizer_state_zeroes_only_the_positions() -> None:
    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.ones(4)
    opt.step()
    reset_optimizer_state(opt, p, torch.tensor([True, False, False, True]))
    assert opt.state[p]["momentum_buffer"].tolist() == [0.0, 1.0, 1.0, 0.0]
