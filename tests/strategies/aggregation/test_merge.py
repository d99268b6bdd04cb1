"""Merge rules: FedAvg reference, exact masked means, consensus density, robust rules, plug-ins."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.aggregation.merge import (
    ClientUpdate,
    _finish,
    consensus_mask,
    coordinate_median,
    masked_weighted_mean,
    stack_kept,
    trimmed_mean,
    weighted_keep,
)
from strategies.aggregation.rules import MERGE_RULES, RoundInput, as_rule, build_rule


def _upd(node: int, values: dict, mask: dict, n: int = 1) -> ClientUpdate:
    values = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in values.items()}
    mask = {k: torch.as_tensor(m, dtype=torch.bool) for k, m in mask.items()}
    return ClientUpdate(node_id=node, values=values, mask=mask, num_examples=n)


def test_all_ones_masks_equal_flower_fedavg() -> None:
    g = torch.Generator().manual_seed(0)
    shapes = {"w": (4, 6), "b": (6,), "c": (2, 3, 3)}
    updates, records = [], []
    for i, n in enumerate([3, 10, 7]):
        vals = {k: torch.randn(*s, generator=g) for k, s in shapes.items()}
        ones = {k: torch.ones(*s, dtype=torch.bool) for k, s in shapes.items() if k != "b"}
        updates.append(ClientUpdate(i, vals, ones, n))
        records.append(
            RecordDict({"arrays": ArrayRecord(vals), "metrics": MetricRecord({"num-examples": n})})
        )
    previous = {k: torch.zeros(*s) for k, s in shapes.items()}
    ours = masked_weighted_mean(updates, previous)
    ref = aggregate_arrayrecords(records, "num-examples")
    for k in shapes:
        np.testing.assert_allclose(ours[k].numpy(), ref[k].numpy(), rtol=0, atol=1e-6)


def test_masked_mean_exact_tiny() -> None:
    prev = {"w": torch.tensor([9.0, 9.0, 9.0, 9.0]), "b": torch.tensor([0.0])}
    a = _upd(1, {"w": [1.0, 2.0, 0.0, 0.0], "b": [1.0]}, {"w": [1, 1, 0, 0]}, n=1)
    b = _upd(2, {"w": [3.0, 0.0, 0.0, 0.0], "b": [2.0]}, {"w": [1, 0, 0, 0]}, n=3)
    c = _upd(3, {"w": [5.0, 0.0, 0.0, 0.0], "b": [4.0]}, {"w": [1, 0, 0, 0]}, n=4)
    out = masked_weighted_mean([a, b, c], prev)
    # coord 0: (1*1 + 3*3 + 4*5) / 8 = 30/8; coord 1: kept by client 1 only -> its value;
    # coords 2, 3: kept by nobody -> previous global value.
    assert out["w"].tolist() == [3.75, 2.0, 9.0, 9.0]
    assert out["b"].tolist() == [pytest.approx((1 + 6 + 16) / 8)]
    assert out["w"].dtype == torch.float32


def test_integer_buffers_round_back() -> None:
    prev = {"n": torch.tensor(0)}
    ups = [
        ClientUpdate(1, {"n": torch.tensor(4)}, {}, 1),
        ClientUpdate(2, {"n": torch.tensor(5)}, {}, 1),
    ]
    out = masked_weighted_mean(ups, prev)
    assert out["n"].dtype == torch.int64 and int(out["n"]) in (4, 5)


def test_merge_input_errors() -> None:
    prev = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="empty"):
        masked_weighted_mean([], prev)
    with pytest.raises(ValueError, match="keys"):
        masked_weighted_mean([_upd(1, {"x": [0.0, 0.0]}, {})], prev)
    with pytest.raises(ValueError, match="num_examples"):
        masked_weighted_mean([_upd(1, {"w": [0.0, 0.0]}, {}, n=0)], prev)
    with pytest.raises(ValueError, match="beta"):
        trimmed_mean([_upd(1, {"w": [0.0, 0.0]}, {})], prev, beta=0.5)
    with pytest.raises(ValueError, match="unknown merge rule"):
        build_rule("no-such-rule")


def test_median_exact() -> None:
    prev = {"w": torch.tensor([7.0, 7.0, 7.0])}
    ups = [
        _upd(1, {"w": [1.0, 10.0, 0.0]}, {"w": [1, 1, 0]}),
        _upd(2, {"w": [2.0, 20.0, 0.0]}, {"w": [1, 1, 0]}),
        _upd(3, {"w": [100.0, 0.0, 0.0]}, {"w": [1, 0, 0]}),
    ]
    out = coordinate_median(ups, prev)
    # coord 0: median{1,2,100} = 2; coord 1: mean of the two middles {10,20} = 15; coord 2: prev.
    assert out["w"].tolist() == [2.0, 15.0, 7.0]


def test_trimmed_mean_exact() -> None:
    vals = [1.0, 2.0, 3.0, 4.0, 100.0]
    ups = [_upd(i, {"w": [v, v]}, {"w": [1, i % 2]}) for i, v in enumerate(vals)]
    prev = {"w": torch.zeros(2)}
    out = trimmed_mean(ups, prev, beta=0.2)
    # coord 0: c=5, t=1 -> mean(2,3,4) = 3; coord 1: kept by i in {1,3} -> c=2, t=0 -> (2+4)/2.
    assert out["w"].tolist() == [3.0, 3.0]
    assert build_rule("trimmed-mean", {"trim": 0.0}).fn(ups, prev)["w"].tolist() == [22.0, 3.0]  # type: ignore[attr-defined]


def test_consensus_mask_votes_and_ties() -> None:
    ups = [
        _upd(1, {"w": [0.0] * 6}, {"w": [1, 1, 0, 0, 1, 0]}, n=2),
        _upd(2, {"w": [0.0] * 6}, {"w": [1, 0, 1, 0, 1, 0]}, n=1),
        _upd(3, {"w": [0.0] * 6}, {"w": [0, 1, 1, 0, 0, 1]}, n=1),
    ]
    # votes = [3, 3, 2, 0, 3, 1]; k = round(0.5 * 6) = 3 -> the three 3-vote coords.
    m = consensus_mask(ups, {"w": 0.5}, {"w": torch.zeros(6)})
    assert m["w"].tolist() == [True, True, False, False, True, False]
    # k = 4: coords 2 (2 votes) added. k = 5 with a tie at 1 vote? only coord 5 has 1 vote.
    m = consensus_mask(ups, {"w": 4 / 6}, {"w": torch.zeros(6)})
    assert m["w"].nonzero().flatten().tolist() == [0, 1, 2, 4]
    # Ties broken by |merged value|: among the 3-vote coords keep the largest two.
    m = consensus_mask(ups, {"w": 2 / 6}, {"w": torch.tensor([0.1, -5.0, 0, 0, 2.0, 0])})
    assert m["w"].nonzero().flatten().tolist() == [1, 4]
    # Density clamps to at least one active entry.
    assert int(consensus_mask(ups, {"w": 0.0}, {"w": torch.zeros(6)})["w"].sum()) == 1


@settings(max_examples=30, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 6), st.integers(1, 7)),
    density=st.floats(0.0, 1.0),
    nclients=st.integers(1, 4),
    seed=st.integers(0, 1000),
)
def test_consensus_density_is_exact(
    shape: tuple[int, int], density: float, nclients: int, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    ups = [
        ClientUpdate(
            i,
            {"w": torch.randn(*shape, generator=g)},
            {"w": torch.rand(*shape, generator=g) < 0.4},
            int(torch.randint(1, 50, (1,), generator=g)),
        )
        for i in range(nclients)
    ]
    numel = shape[0] * shape[1]
    m = consensus_mask(ups, {"w": density}, {"w": torch.randn(*shape, generator=g)})
    assert int(m["w"].sum()) == min(numel, max(1, round(density * numel)))
    assert m["w"].shape == torch.Size(shape) and m["w"].dtype == torch.bool


@settings(max_examples=30, deadline=None)
@given(
    nclients=st.integers(1, 5),
    seed=st.integers(0, 1000),
    rule=st.sampled_from(["mean", "median", "trimmed-mean"]),
)
def test_identical_updates_merge_to_identity(nclients: int, seed: int, rule: str) -> None:
    g = torch.Generator().manual_seed(seed)
    vals = {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g)}
    mask = {"w": torch.rand(3, 4, generator=g) < 0.5}
    vals["w"] = vals["w"] * mask["w"]
    ups = [ClientUpdate(i, dict(vals), dict(mask), i + 1) for i in range(nclients)]
    prev = {"w": vals["w"].clone(), "b": torch.zeros(4)}
    out = build_rule(rule).aggregate(RoundInput(1, mask, prev, ups))
    assert torch.allclose(out["w"], vals["w"], atol=1e-6)
    assert torch.allclose(out["b"], vals["b"], atol=1e-6)


class ClippedMean:
    """A user rule in a few lines: clip each coordinate to +-c, then the masked mean."""

    def __init__(self, c: float) -> None:
        self.c = c
        self.calls = 0

    def __call__(self, updates: list[ClientUpdate], previous: dict) -> dict:
        self.calls += 1
        out = {}
        for key in previous:
            vals, keep, w = stack_kept(updates, key)
            wk = keep.double() * w.view(-1, *([1] * (vals.dim() - 1)))
            num = (wk * vals.clamp(-self.c, self.c)).sum(0)
            den = wk.sum(0)
            out[key] = torch.where(den > 0, num / den.clamp_min(1e-12), previous[key].double())
            out[key] = out[key].to(previous[key].dtype)
        return out


def test_custom_rule_and_registry() -> None:
    rule = ClippedMean(1.0)
    assert as_rule(rule).fn is rule  # type: ignore[attr-defined]
    ups = [_upd(1, {"w": [5.0, 0.5]}, {}), _upd(2, {"w": [-0.5, 0.5]}, {})]
    assert rule(ups, {"w": torch.zeros(2)})["w"].tolist() == [0.25, 0.5]
    MERGE_RULES.register("clipped-test", ClippedMean)
    try:  # a class is a factory: its options are its constructor's keyword arguments
        built = build_rule("clipped-test", {"c": 2.0})
        assert isinstance(built.fn, ClippedMean) and built.fn.c == 2.0  # type: ignore[attr-defined]
        with pytest.raises(ValueError, match="already registered"):
            MERGE_RULES.register("clipped-test", lambda: ClippedMean(1.0))
    finally:
        MERGE_RULES._builtins.pop("clipped-test")
    assert set(MERGE_RULES.names()) >= {"mean", "median", "trimmed-mean", "fedadam"}


def test_stack_kept_converts_like_one_conversion_per_client() -> None:
    """One float64 conversion of the stack gives the per-client conversions' exact values;
    clients sending different dtypes still stack (each converted first)."""
    g = torch.Generator().manual_seed(3)
    same = [ClientUpdate(i, {"w": torch.randn(4, 5, generator=g)}, {}, 2) for i in range(3)]
    vals, keep, w = stack_kept(same, "w")
    want = torch.stack([u.values["w"].to(torch.float64) for u in same])
    assert vals.dtype == torch.float64 and torch.equal(vals, want)
    assert bool(keep.all()) and w.tolist() == [2.0, 2.0, 2.0]
    mixed = [*same, ClientUpdate(9, {"w": torch.randn(4, 5, generator=g).half()}, {}, 1)]
    got = stack_kept(mixed, "w")[0]
    assert torch.equal(got, torch.stack([u.values["w"].to(torch.float64) for u in mixed]))


def _dense_reference(updates: list[ClientUpdate], prev: dict[str, torch.Tensor]) -> dict:
    """masked_weighted_mean as computed before its sparse path: every key on [C, numel]."""
    out = {}
    for key in prev:
        vals, keep, w = stack_kept(updates, key)
        wk = weighted_keep(keep, w)
        denom = wk.sum(0)
        merged = (wk * vals).sum(0) / denom.clamp_min(1e-300)
        out[key] = _finish(merged, denom > 0, prev[key])
    return out


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 40),
    st.integers(0, 2**31 - 1),
    st.floats(0.0, 1.0),
    st.sampled_from([torch.float32, torch.float64]),
)
def test_sparse_path_has_the_dense_bits(
    nclients: int, seed: int, density: float, dtype: torch.dtype
) -> None:
    """Keys every client masks merge on the kept coordinates only: the dense result up to
    the order torch sums clients in (exact for fp32 values whose weighted sum fits float64's
    53 bits, as a model's usually do), and the same bits for the same inputs."""
    g = torch.Generator().manual_seed(seed)
    prev = {"w": torch.randn(6, 17, generator=g).to(dtype), "b": torch.randn(6, generator=g)}
    updates = []
    for i in range(nclients):
        m = torch.rand(6, 17, generator=g) < density
        w = (torch.randn(6, 17, generator=g) * 3).to(dtype) * m
        b = torch.randn(6, generator=g)
        n = int(torch.randint(1, 500, (1,), generator=g))
        updates.append(ClientUpdate(i, {"w": w, "b": b}, {"w": m}, n))
    got, want = masked_weighted_mean(updates, prev), _dense_reference(updates, prev)
    again = masked_weighted_mean(updates, prev)
    for k in prev:
        assert got[k].dtype == want[k].dtype
        assert torch.allclose(got[k], want[k], rtol=1e-12 if dtype == torch.float64 else 0, atol=0)
        assert torch.equal(got[k].view(-1).view(torch.uint8), again[k].view(-1).view(torch.uint8))
