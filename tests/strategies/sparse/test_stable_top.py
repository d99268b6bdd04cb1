"""Drop/grow selection by the n-th value equals the stable full sort it replaced, ties included."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from strategies.sparse.prune_grow import drop_lowest, grow_highest

# Few distinct values (ties everywhere), signed zeros, infinities and NaN.
VALUES = st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, float("inf"), -float("inf"), float("nan")])


def _by_sort(mask: torch.Tensor, score: torch.Tensor, n: int, grow: bool) -> torch.Tensor:
    idx = ((~mask) if grow else mask).reshape(-1).nonzero().squeeze(1)
    s = torch.nan_to_num(score.reshape(-1)[idx].float(), nan=-float("inf"))
    order = torch.argsort(s, descending=grow, stable=True)
    out = torch.zeros(mask.numel(), dtype=torch.bool)
    out[idx[order[:n]]] = True
    return out.view(mask.shape)


@given(
    st.lists(st.tuples(st.booleans(), VALUES), min_size=1, max_size=60),
    st.floats(0.0, 1.0),
)
def test_selection_matches_the_stable_sort(cells: list[tuple[bool, float]], frac: float) -> None:
    mask = torch.tensor([m for m, _ in cells])
    score = torch.tensor([v for _, v in cells])
    n_drop = int(frac * int(mask.sum()))
    assert torch.equal(drop_lowest(mask, score, n_drop), _by_sort(mask, score, n_drop, False))
    n_grow = int(frac * int((~mask).sum()))
    assert torch.equal(grow_highest(mask, score, n_grow), _by_sort(mask, score, n_grow, True))


def test_ties_go_to_the_earlier_position() -> None:
    mask = torch.zeros(6, dtype=torch.bool)
    score = torch.tensor([1.0, 3.0, 1.0, 3.0, 3.0, 0.0])
    assert grow_highest(mask, score, 2).tolist() == [False, True, False, True, False, False]
    assert drop_lowest(~mask, score, 2).tolist() == [True, False, False, False, False, True]
