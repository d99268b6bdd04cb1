"""Sparse secure sums: the decoded sum equals the plaintext mask-aware mean within the bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.aggregation.merge import ClientUpdate, masked_weighted_mean
from strategies.secure.ring import Layout, Segment, error_bound, quantize
from strategies.secure.sparse_sum import SparseSumPlan


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 62), st.lists(st.integers(0, 2**62), min_size=0, max_size=40))
def test_pack_unpack_roundtrip(bits: int, values: list[int]) -> None:
    layout = Layout((Segment("a", len(values), bits), Segment("b", 2, 7)))
    v = np.array(values + [3, 200], dtype=np.uint64)
    out = layout.unpack(layout.pack(v))
    mask = np.uint64(2**bits - 1)
    assert np.array_equal(out[: len(values)], v[: len(values)] & mask)
    assert np.array_equal(out[len(values) :], np.array([3, 200 & 127], dtype=np.uint64))
    assert len(layout.pack(v)) == layout.packed_bytes


def test_quantization_error_is_within_the_documented_bound() -> None:
    x = np.linspace(-0.5, 0.5, 1001)
    z, clipped = quantize(x, 0.5, 12)
    assert clipped == 0
    assert np.max(np.abs(z / ((2**11 - 1) / 0.5) - x)) <= error_bound(0.5, 12) + 1e-15
    assert quantize(np.array([2.0, -3.0, 0.1]), 1.0, 8)[1] == 2


def _clients(full: bool):
    g = torch.Generator().manual_seed(0)
    shapes = {"w": (4, 5), "b": (5,)}
    consensus = {"w": torch.rand(4, 5, generator=g) < 0.5}
    prev = {"w": torch.randn(4, 5, generator=g) * consensus["w"], "b": torch.randn(5, generator=g)}
    updates = []
    for i, n in enumerate((30, 70, 45)):
        own = consensus["w"].clone()
        if full:  # client i prunes one kept coordinate and regrows one outside M
            on, off = own.reshape(-1).nonzero()[i], (~own).reshape(-1).nonzero()[i]
            own.view(-1)[on], own.view(-1)[off] = False, True
        vals = {k: prev[k] + 0.1 * torch.randn(shapes[k], generator=g) for k in shapes}
        vals["w"] = vals["w"] * own
        updates.append(ClientUpdate(i, vals, {"w": own}, n))
    return shapes, consensus, prev, updates


@pytest.mark.parametrize("full", [False, True])
def test_secure_mean_equals_plaintext_masked_mean(full: bool) -> None:
    shapes, consensus, prev, updates = _clients(full)
    plan = SparseSumPlan(
        shapes, consensus, full, clip=1.0, quant_bits=16, max_weight=100, num_clients=3
    )
    total = np.zeros(plan.layout().length, dtype=np.uint64)
    for u in updates:
        total += plan.encode(prev, u.values, u.mask, u.num_examples, loss=0.5)
    out = plan.decode(total, prev)
    # Plaintext reference on the public mask: every client's values restricted to M.
    on_m = [
        ClientUpdate(u.node_id, u.values, {"w": u.mask["w"] & consensus["w"]}, u.num_examples)
        for u in updates
    ]
    ref = masked_weighted_mean(on_m, prev)
    m = consensus["w"]
    bound = error_bound(1.0, 16)
    assert torch.max(torch.abs(out.values["w"][m] - ref["w"][m])) <= bound
    assert torch.max(torch.abs(out.values["b"] - ref["b"])) <= bound
    assert torch.equal(out.values["w"][~m], prev["w"][~m])
    assert out.total_weight == 145 and out.clipped == 0
    assert out.train_loss == pytest.approx(0.5, abs=1e-2)
    if full:
        expect = sum(u.mask["w"].double() for u in updates)
        assert torch.equal(out.votes["w"], expect)
    assert len(plan.layout().pack(total)) == plan.layout().packed_bytes
