"""Server fast paths equal what they replace, bit for bit: metric averages and vote weights."""

from __future__ import annotations

import torch
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.aggregation.merge import ClientUpdate, masked_weighted_mean, weighted_keep
from strategies.aggregation.metric_rules import weighted_average

_value = st.one_of(
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False, allow_infinity=False, width=64, min_value=-1e12, max_value=1e12),
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 10**6), st.lists(_value, min_size=3, max_size=3)),
        min_size=1,
        max_size=30,
    )
)
def test_weighted_average_is_flowers_average(rows: list[tuple[int, list[int | float]]]) -> None:
    records = [{"num-examples": n, "loss": a, "acc": b, "density": c} for n, (a, b, c) in rows]
    ref = aggregate_metricrecords(
        [RecordDict({"metrics": MetricRecord(dict(r))}) for r in records], "num-examples"
    )
    got = weighted_average(records, "num-examples")
    assert list(got.items()) == list(ref.items())  # same keys, order and exact floats


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 40),
    st.lists(st.integers(1, 5), min_size=1, max_size=3),
    st.integers(0, 2**31),
    st.booleans(),
)
def test_weighted_keep_is_the_product(
    clients: int, shape: list[int], seed: int, ints: bool
) -> None:
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand((clients, *shape), generator=g) < 0.4
    w = (
        torch.randint(1, 1000, (clients,), generator=g).double()
        if ints
        else torch.rand(clients, generator=g).double() * 1e3 + 1e-12
    )
    ref = keep.to(torch.float64) * w.view(-1, *([1] * len(shape)))
    assert torch.equal(weighted_keep(keep, w).view(torch.int64), ref.view(torch.int64))


def test_weighted_keep_falls_back_on_odd_weights() -> None:
    keep = torch.tensor([[True, False], [False, True]])
    for w in ([0.0, 2.0], [float("nan"), 1.0], [float("inf"), 1.0], [-1.0, 1.0]):
        ref = keep.to(torch.float64) * torch.tensor(w, dtype=torch.float64).view(-1, 1)
        got = weighted_keep(keep, torch.tensor(w, dtype=torch.float64))
        assert torch.equal(got.view(torch.int64), ref.view(torch.int64))


def test_merge_unchanged_on_a_fixed_case() -> None:
    # masked_weighted_mean through weighted_keep: exact expected values.
    prev = {"w": torch.tensor([1.0, 2.0, 3.0])}
    ups = [
        ClientUpdate(
            1, {"w": torch.tensor([4.0, 0.0, 6.0])}, {"w": torch.tensor([1, 0, 1]).bool()}, 1
        ),
        ClientUpdate(
            2, {"w": torch.tensor([1.0, 0.0, 0.0])}, {"w": torch.tensor([1, 0, 0]).bool()}, 3
        ),
    ]
    out = masked_weighted_mean(ups, prev)["w"]
    assert out.tolist() == [1.75, 2.0, 6.0]
