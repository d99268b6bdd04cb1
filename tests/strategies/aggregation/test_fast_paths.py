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


def _old_masked_weighted_mean(
    updates: list[ClientUpdate], previous: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """masked_weighted_mean as it was: float64 stacks and an explicit float mask."""
    out = {}
    for key, prev in previous.items():
        vals = torch.stack([u.values[key].to(torch.float64) for u in updates])
        keep = torch.stack(
            [
                u.mask[key] if key in u.mask else torch.ones_like(prev, dtype=torch.bool)
                for u in updates
            ]
        )
        w = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)
        wk = keep.to(torch.float64) * w.view(-1, *([1] * (vals.dim() - 1)))
        denom = wk.sum(0)
        merged = (wk * vals).sum(0) / denom.clamp_min(1e-300)
        full = torch.where(denom > 0, merged, prev.to(torch.float64))
        out[key] = (
            full.to(prev.dtype) if prev.dtype.is_floating_point else full.round().to(prev.dtype)
        )
    return out


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 30), st.integers(0, 2**31), st.floats(0.05, 1.0))
def test_masked_weighted_mean_bits_unchanged(clients: int, seed: int, density: float) -> None:
    g = torch.Generator().manual_seed(seed)
    prev = {
        "w": torch.randn(7, 9, generator=g),
        "b": torch.randn(9, generator=g),
        "n": torch.tensor(5, dtype=torch.int64),
        "h": torch.randn(3, generator=g).to(torch.float16),
    }
    ups = []
    for i in range(clients):
        m = torch.rand(7, 9, generator=g) < density
        scale = float(torch.rand(1, generator=g)) * 1e4
        vals = {
            "w": torch.randn(7, 9, generator=g) * scale * m,
            "b": torch.randn(9, generator=g) * scale,
            "n": torch.tensor(int(torch.randint(0, 100, (1,), generator=g))),
            "h": (torch.randn(3, generator=g)).to(torch.float16),
        }
        ups.append(ClientUpdate(i, vals, {"w": m}, int(torch.randint(1, 500, (1,), generator=g))))
    new, old = masked_weighted_mean(ups, prev), _old_masked_weighted_mean(ups, prev)
    for k in prev:
        assert new[k].dtype == old[k].dtype
        assert new[k].numpy().tobytes() == old[k].numpy().tobytes(), k
