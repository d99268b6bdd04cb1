import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.sparse.prune_grow import (
    DROP_RULES,
    GROW_RULES,
    LayerState,
    check_prune_grow,
    drop_lowest,
    get_grow_rule,
    grow_highest,
    magnitude_prune_to,
    prune_and_grow,
    register_grow_rule,
)
from strategies.sparse.scores import gradient_score, magnitude_score, random_score, taylor_score


def test_scores() -> None:
    w = torch.tensor([-2.0, 1.0])
    g = torch.tensor([3.0, -4.0])
    assert torch.equal(magnitude_score(w), torch.tensor([2.0, 1.0]))
    assert torch.equal(gradient_score(g), torch.tensor([3.0, 4.0]))
    assert torch.equal(taylor_score(w, g), torch.tensor([6.0, 4.0]))
    r1 = random_score((2, 3), torch.Generator().manual_seed(3))
    r2 = random_score((2, 3), torch.Generator().manual_seed(3))
    assert torch.equal(r1, r2) and r1.shape == (2, 3)


def test_drop_lowest_exact() -> None:
    mask = torch.tensor([True, True, False, True, True])
    score = torch.tensor([5.0, 1.0, 0.0, 3.0, 2.0])
    d = drop_lowest(mask, score, 2)
    assert d.tolist() == [False, True, False, False, True]  # inactive 0.0 never chosen
    with pytest.raises(ValueError, match="cannot drop 5 of 4"):
        drop_lowest(mask, score, 5)
    with pytest.raises(ValueError, match="shape"):
        drop_lowest(mask, score[:3], 1)


def test_grow_highest_exact_and_forbidden() -> None:
    mask = torch.tensor([True, False, False, False, True])
    score = torch.tensor([9.0, 1.0, 5.0, 3.0, 9.0])
    assert grow_highest(mask, score, 2).tolist() == [False, False, True, True, False]
    forbidden = torch.tensor([False, False, True, False, False])
    assert grow_highest(mask, score, 2, forbidden).tolist() == [False, True, False, True, False]
    with pytest.raises(ValueError, match="only 2 candidates"):
        grow_highest(mask, score, 3, forbidden)


def test_prune_and_grow_exact_2d() -> None:
    mask = torch.tensor([[True, True, False], [False, True, False]])
    w = torch.tensor([[0.1, 2.0, 0.0], [0.0, 3.0, 0.0]])
    g = torch.tensor([[9.0, 0.0, 1.0], [5.0, 0.0, 0.5]])
    new, dropped, grown = prune_and_grow(mask, w.abs(), g.abs(), 1)
    assert dropped.tolist() == [[True, False, False], [False, False, False]]
    # (0, 0) has the largest gradient but was just dropped: never re-grown.
    assert grown.tolist() == [[False, False, False], [True, False, False]]
    assert new.tolist() == [[False, True, False], [True, True, False]]


def test_check_prune_grow_raises() -> None:
    m = torch.tensor([True, False])
    with pytest.raises(RuntimeError, match="already active"):
        check_prune_grow(m, torch.tensor([False, False]), m.clone(), m.clone())
    with pytest.raises(RuntimeError, match="not active"):
        check_prune_grow(m, ~m, torch.zeros(2, dtype=torch.bool), m)


def test_magnitude_prune_to() -> None:
    mask = torch.tensor([True, True, True, False])
    score = torch.tensor([3.0, 1.0, 2.0, 9.0])
    assert magnitude_prune_to(mask, score, 1).tolist() == [True, False, False, False]
    assert torch.equal(magnitude_prune_to(mask, score, 5), mask)  # never grows
    with pytest.raises(ValueError, match="target_active"):
        magnitude_prune_to(mask, score, -1)


@st.composite
def pg_case(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    rows = draw(st.integers(1, 6))
    cols = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=g) < draw(st.floats(0.0, 1.0))
    # ties on purpose: integer-valued scores
    drop_score = torch.randint(0, 3, (rows, cols), generator=g).float()
    grow_score = torch.randint(0, 3, (rows, cols), generator=g).float()
    active = int(mask.sum())
    n = draw(st.integers(0, min(active, mask.numel() - active)))
    return mask, drop_score, grow_score, n


@settings(max_examples=150, deadline=None)
@given(pg_case())
def test_prune_and_grow_invariants(
    case: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int],
) -> None:
    mask, ds, gs, n = case
    new, dropped, grown = prune_and_grow(mask, ds, gs, n)
    assert int(new.sum()) == int(mask.sum())  # active count kept
    assert not bool((dropped & grown).any())  # disjoint
    assert not bool((grown & mask).any())  # grown were inactive before
    assert bool((dropped <= mask).all())  # dropped were active
    assert int(dropped.sum()) == n and int(grown.sum()) == n
    # dropped are the lowest drop scores among active entries
    if n:
        kept = mask & ~dropped
        if bool(kept.any()):
            assert float(ds[dropped].max()) <= float(ds[kept].min())
        cand = ~mask & ~grown
        if bool(cand.any()):
            assert float(gs[grown].min()) >= float(gs[cand].max())


def test_rule_registry_is_extensible() -> None:
    assert set(DROP_RULES) >= {"magnitude"}
    assert set(GROW_RULES) >= {"random", "gradient"}

    def first_free(
        layer: LayerState, mask_after_drop: torch.Tensor, forbidden: torch.Tensor, n: int
    ) -> torch.Tensor:
        pos = -torch.arange(mask_after_drop.numel(), dtype=torch.float32)
        return grow_highest(mask_after_drop, pos.view(mask_after_drop.shape), n, forbidden)

    register_grow_rule("test_first_free", first_free)
    try:
        rule = get_grow_rule("test_first_free")
        mask = torch.tensor([True, False, False])
        layer = LayerState("w", torch.ones(3), mask)
        out = rule(layer, mask, torch.zeros(3, dtype=torch.bool), 1)
        assert out.tolist() == [False, True, False]
        with pytest.raises(ValueError, match="already registered"):
            register_grow_rule("test_first_free", first_free)
    finally:
        GROW_RULES.pop("test_first_free")
    with pytest.raises(ValueError, match="unknown grow rule"):
        get_grow_rule("test_first_free")
