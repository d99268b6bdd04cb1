"""Reservoir replay: capacity bound, uniform inclusion (chi-square), seeded determinism, state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.continual.replay import ReservoirBuffer


def feed(buf: ReservoirBuffer, n: int, batch: int = 7) -> None:
    ids = torch.arange(n)
    for s in range(0, n, batch):
        chunk = ids[s : s + batch]
        buf.add(chunk.float().unsqueeze(1).repeat(1, 2), chunk)  # x [B, 2], y [B] = example id


@settings(max_examples=30, deadline=None)
@given(capacity=st.integers(0, 20), n=st.integers(0, 100), batch=st.integers(1, 9))
def test_never_exceeds_capacity_and_keeps_pairs_aligned(capacity: int, n: int, batch: int) -> None:
    buf = ReservoirBuffer(capacity, seed=1)
    feed(buf, n, batch)
    assert len(buf) == min(n, capacity)
    assert buf.seen == n
    if len(buf):
        x, y = buf.sample(100)
        assert len(y) == len(buf)
        assert len(set(y.tolist())) == len(y)  # distinct examples, no duplicates
        assert torch.equal(x[:, 0].long(), y)  # x and y still belong together


def test_first_capacity_items_fill_in_order() -> None:
    buf = ReservoirBuffer(5, seed=0)
    feed(buf, 5)
    assert buf.state_dict()["y"].tolist() == [0, 1, 2, 3, 4]


def test_inclusion_is_uniform_chi_square() -> None:
    # 2000 buffers of capacity 10 over a stream of 50: each item is kept with p = 10/50,
    # so the expected count per item is 2000 * 0.2 = 400. Chi-square with 49 dof: the 0.999
    # quantile is ~85.4; a loose 100 bound still catches e.g. keeping only the first items.
    counts = np.zeros(50)
    for seed in range(2000):
        buf = ReservoirBuffer(10, seed=seed)
        feed(buf, 50, batch=50)
        counts[buf.state_dict()["y"].numpy()] += 1
    assert counts.sum() == 2000 * 10
    expected = 400.0
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 100.0, chi2


def test_same_seed_same_buffer_and_samples() -> None:
    a, b, c = ReservoirBuffer(8, seed=3), ReservoirBuffer(8, seed=3), ReservoirBuffer(8, seed=4)
    for buf in (a, b, c):
        feed(buf, 200)
    assert torch.equal(a.state_dict()["y"], b.state_dict()["y"])
    assert not torch.equal(a.state_dict()["y"], c.state_dict()["y"])
    ga, gb = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(a.sample(4, ga)[1], b.sample(4, gb)[1])


def test_state_roundtrip_continues_identically() -> None:
    a = ReservoirBuffer(6, seed=5)
    feed(a, 40)
    state = a.state_dict()
    assert state["x"].shape == (6, 2)  # only the filled part, bounded by capacity
    b = ReservoirBuffer(6)
    b.load_state_dict(state)
    more_x, more_y = torch.full((30, 2), 7.0), torch.arange(100, 130)
    a.add(more_x, more_y)
    b.add(more_x, more_y)
    assert torch.equal(a.state_dict()["y"], b.state_dict()["y"])
    assert a.nbytes == b.nbytes == 6 * (2 * 4 + 8)


def test_mix_and_errors() -> None:
    buf = ReservoirBuffer(4, seed=0)
    x, y = torch.zeros(3, 2), torch.zeros(3, dtype=torch.long)
    assert buf.mix(x, y, 2)[0].shape == (3, 2)  # empty buffer: batch unchanged
    feed(buf, 10)
    mx, my = buf.mix(x, y, 2, torch.Generator().manual_seed(0))
    assert mx.shape == (5, 2) and my.shape == (5,)
    with pytest.raises(ValueError, match="capacity"):
        ReservoirBuffer(-1)
    with pytest.raises(ValueError, match="shape"):
        buf.add(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x \[B"):
        buf.add(torch.zeros(2, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        ReservoirBuffer(3).sample(1)
    with pytest.raises(ValueError, match="capacity"):
        ReservoirBuffer(5).load_state_dict(buf.state_dict())
    bad = {**buf.state_dict(), "y": torch.zeros(2, dtype=torch.long)}
    with pytest.raises(ValueError, match="holds"):
        ReservoirBuffer(4).load_state_dict(bad)
