"""Robust rules: equal to Flower's own strategies with all-ones masks; sparse invariants; vote."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import Bulyan, FedMedian, FedTrimmedAvg, Krum, MultiKrum
from flwr.serverapp.strategy.strategy import Strategy
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.aggregation import robust
from strategies.aggregation.merge import (
    ClientUpdate,
    MergeOptions,
    consensus_mask,
    coordinate_median,
    trimmed_mean,
)
from strategies.aggregation.robust import (
    ClippedMedian,
    bulyan,
    clip_updates,
    robust_consensus_mask,
    update_deltas,
)
from strategies.aggregation.rules import get_merge_rule

SHAPES = {"w": (5, 4), "b": (4,), "c": (2, 3, 2)}


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    # Flower sets these when a ServerApp starts; instruction Messages need them.
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _dense_round(n: int, seed: int) -> tuple[list[ClientUpdate], list[Message]]:
    """n clients with dense (all-ones) masks, as our updates and as Flower train replies."""
    g = torch.Generator().manual_seed(seed)
    updates, replies = [], []
    for i in range(n):
        vals = {k: torch.randn(*s, generator=g, dtype=torch.float64) for k, s in SHAPES.items()}
        if i % 3 == 0:  # some far-off clients, so the selection rules have something to do
            vals = {k: v * 5 + 3 for k, v in vals.items()}
        ones = {k: torch.ones(*s, dtype=torch.bool) for k, s in SHAPES.items() if k != "b"}
        examples = int(torch.randint(1, 50, (1,), generator=g))
        updates.append(ClientUpdate(i + 1, vals, ones, examples))
        content = RecordDict(
            {
                "arrays": ArrayRecord(vals),
                "metrics": MetricRecord({"num-examples": examples}),
            }
        )
        ins = Message(RecordDict(), dst_node_id=i + 1, message_type=MessageType.TRAIN)
        replies.append(Message(content, reply_to=ins))
    return updates, replies


def _flower(strategy: Strategy, replies: list[Message]) -> dict[str, np.ndarray]:
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    return {k: a.numpy() for k, a in arrays.items()}


CASES = [
    ("median", MergeOptions(), FedMedian()),
    ("trimmed-mean", MergeOptions(trim=0.2), FedTrimmedAvg(beta=0.2)),
    ("trimmed-mean", MergeOptions(trim=0.35), FedTrimmedAvg(beta=0.35)),
    ("krum", MergeOptions(num_malicious=2), Krum(num_malicious_nodes=2)),
    (
        "multi-krum",
        MergeOptions(num_malicious=1, krum_select=4),
        MultiKrum(num_malicious_nodes=1, num_nodes_to_select=4),
    ),
    (
        "multi-krum",  # n - f by default
        MergeOptions(num_malicious=2),
        MultiKrum(num_malicious_nodes=2, num_nodes_to_select=9 - 2),
    ),
    ("bulyan", MergeOptions(num_malicious=1), Bulyan(num_malicious_nodes=1)),
    ("bulyan", MergeOptions(num_malicious=0), Bulyan(num_malicious_nodes=0)),
]


@pytest.mark.parametrize(("rule", "options", "flower"), CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_all_ones_masks_equal_flower(
    rule: str, options: MergeOptions, flower: Strategy, seed: int
) -> None:
    updates, replies = _dense_round(9, seed)
    previous = {k: torch.zeros(*s, dtype=torch.float64) for k, s in SHAPES.items()}
    ours = get_merge_rule(rule, options=options)(updates, previous)
    ref = _flower(flower, replies)
    for k in SHAPES:
        np.testing.assert_allclose(ours[k].numpy(), ref[k], rtol=1e-9, atol=1e-9)


def test_bulyan_with_too_few_clients_keeps_previous() -> None:
    updates, _ = _dense_round(6, 0)  # 6 < 4f + 3 = 7
    previous = {k: torch.full(s, 7.0, dtype=torch.float64) for k, s in SHAPES.items()}
    out = bulyan(updates, previous, num_malicious=1)
    assert all(torch.equal(out[k], previous[k]) for k in SHAPES)


def _upd(node: int, w: list[float], m: list[int], n: int = 1) -> ClientUpdate:
    return ClientUpdate(node, {"w": torch.tensor(w)}, {"w": torch.tensor(m, dtype=torch.bool)}, n)


def test_min_support_and_real_trim_on_sparse_coordinates() -> None:
    prev = {"w": torch.tensor([7.0, 7.0, 7.0])}
    # coord 0 kept by 5 clients, coord 1 by 2 (one attacker at 1000), coord 2 by the attacker.
    ups = [_upd(i, [float(i), float(i), 0.0], [1, int(i == 1), 0]) for i in range(1, 5)]
    ups.append(_upd(9, [1000.0, 1000.0, 1000.0], [1, 1, 1]))
    # beta * c rounds to 0 where c <= 4: without a trim floor the attacker is averaged in there.
    assert trimmed_mean(ups, prev, 0.2)["w"].tolist() == [3.0, 500.5, 1000.0]
    # min_trim = f = 1: coord 0 mean(2,3,4); coord 1 c = 2 < 2t + 1 and coord 2 c = 1: previous.
    assert trimmed_mean(ups, prev, 0.2, min_trim=1)["w"].tolist() == [3.0, 7.0, 7.0]
    med = get_merge_rule("median", options=MergeOptions(num_malicious=1))(ups, prev)
    assert med["w"].tolist() == [3.0, 7.0, 7.0]  # support 2f + 1 = 3


def test_clipping_bounds_each_update_norm() -> None:
    prev = {"w": torch.tensor([1.0, 1.0, 1.0])}
    ups = [
        _upd(1, [2.0, 1.0, 0.0], [1, 1, 0]),  # delta (1, 0, 0) off-mask -> norm 1
        _upd(2, [1.0, 3.0, 0.0], [1, 1, 0]),  # norm 2
        _upd(3, [101.0, 1.0, 0.0], [1, 0, 0]),  # norm 100
    ]
    assert update_deltas(ups, prev).norm(dim=1).tolist() == [1.0, 2.0, 100.0]
    clipped = clip_updates(ups, prev)  # bound = median norm = 2
    assert update_deltas(clipped, prev).norm(dim=1).tolist() == [1.0, 2.0, 2.0]
    assert clipped[2].values["w"].tolist() == [3.0, 1.0, 0.0]  # off-mask values untouched
    fixed = clip_updates(ups, prev, clip_norm=0.5)
    assert update_deltas(fixed, prev).norm(dim=1).tolist() == [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="clip_norm"):
        clip_updates(ups, prev, clip_norm=-1.0)


def test_krum_distances_see_private_coordinates() -> None:
    # Three honest clients agree on coord 0; the attacker writes a coordinate nobody keeps.
    prev = {"w": torch.zeros(4)}
    ups = [_upd(i, [1.0 + 0.01 * i, 0, 0, 0], [1, 0, 0, 0]) for i in range(1, 5)]
    ups.append(_upd(9, [1.0, 0, 0, 50.0], [1, 0, 0, 1]))
    out = robust.MultiKrum(num_malicious=1)(ups, prev)  # averages n - f = 4: the honest ones
    assert out["w"][3].item() == 0.0 and abs(out["w"][0].item() - 1.025) < 1e-6


HONEST = st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=7, max_size=7)


@settings(max_examples=40, deadline=None)
@given(
    honest=st.lists(HONEST, min_size=3, max_size=3),
    attack=st.floats(-1e6, 1e6, allow_nan=False),
    attackers=st.integers(1, 2),
    density=st.floats(0.3, 1.0),
    seed=st.integers(0, 10_000),
    # Not Bulyan: its last step averages the beta values CLOSEST to the median, and an
    # attacker value just outside the honest range can be among them (e.g. honest 2,0,0,2
    # and attack -1 give -1/3), as in Flower's and El Mhamdi et al.'s; its guarantee is a
    # bounded distance; test_all_ones_masks_equal_flower checks it equals Flower's Bulyan.
    rule=st.sampled_from(["median", "trimmed-mean", "clipped-median"]),
)
def test_f_attackers_stay_within_the_honest_range(
    honest: list[list[float]],
    attack: float,
    attackers: int,
    density: float,
    seed: int,
    rule: str,
) -> None:
    """With f attackers and num-malicious = f, every written coordinate lies within the range
    of the honest values kept there (or is the previous value), whatever the attackers send."""
    g = torch.Generator().manual_seed(seed)
    n_honest = 4 * attackers + 3 - attackers  # enough clients for Bulyan
    values = torch.tensor(honest, dtype=torch.float64).T  # [7, 3]
    values = values[torch.randint(0, 7, (n_honest,), generator=g)]
    masks = torch.rand(n_honest, 3, generator=g) < density
    ups = [ClientUpdate(i, {"w": values[i]}, {"w": masks[i]}, 1 + i) for i in range(n_honest)]
    ups += [
        ClientUpdate(100 + j, {"w": torch.full((3,), attack)}, {"w": torch.ones(3, dtype=bool)}, 1)
        for j in range(attackers)
    ]
    prev = {"w": torch.tensor([0.5, -0.5, 0.25], dtype=torch.float64)}
    out = get_merge_rule(rule, options=MergeOptions(num_malicious=attackers))(ups, prev)["w"]
    for j in range(3):
        kept = values[masks[:, j], j]
        if out[j] == prev["w"][j]:
            continue
        assert len(kept) > 0
        # Clipping scales updates towards the previous value: widen the range to include it.
        lo = min(kept.min().item(), prev["w"][j].item()) if rule == "clipped-median" else kept.min()
        hi = max(kept.max().item(), prev["w"][j].item()) if rule == "clipped-median" else kept.max()
        assert lo - 1e-9 <= out[j].item() <= hi + 1e-9


def test_rule_objects_and_errors() -> None:
    opts = MergeOptions(num_malicious=2, clip_norm=1.5, min_support=4)
    assert get_merge_rule("clipped-median", options=opts) == ClippedMedian(1.5, 4)
    assert get_merge_rule("bulyan", options=opts) == robust.Bulyan(2, 4)
    assert get_merge_rule("krum", options=opts) == robust.MultiKrum(2, 1)
    assert MergeOptions(num_malicious=2).support == 5
    with pytest.raises(ValueError, match="min_support"):
        coordinate_median([_upd(1, [0.0], [1])], {"w": torch.zeros(1)}, min_support=0)


def _honest_vote_round(seed: int) -> tuple[list[ClientUpdate], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    previous = torch.zeros(40, dtype=torch.bool)
    previous[torch.randperm(40, generator=g)[:10]] = True
    honest = [
        ClientUpdate(i, {"w": torch.randn(40, generator=g) * previous}, {"w": previous}, 50 + i)
        for i in range(9)
    ]
    return honest, {"w": previous}


@pytest.mark.parametrize("seed", range(5))
def test_one_attacker_cannot_replace_the_consensus_mask(seed: int) -> None:
    honest, previous = _honest_vote_round(seed)
    g = torch.Generator().manual_seed(1000 + seed)
    rand = torch.zeros(40, dtype=torch.bool)
    rand[torch.randperm(40, generator=g)[:10]] = True
    attacker = ClientUpdate(99, {"w": rand * 1e6}, {"w": rand}, 10**9)  # inflated examples
    ups = honest + [attacker]
    robust = robust_consensus_mask(ups, {"w": 0.25}, previous)
    assert torch.equal(robust["w"], previous["w"])
    # The examples-weighted vote with the magnitude tie-break hands the mask to the attacker.
    merged = {"w": rand * 1e6}
    weighted = consensus_mask(ups, {"w": 0.25}, merged)
    assert torch.equal(weighted["w"], rand)


def test_robust_vote_ties_go_to_previous_mask_then_index() -> None:
    prev = {"w": torch.tensor([0, 0, 1, 0, 1, 0], dtype=torch.bool)}
    ups = [
        _upd(1, [0.0] * 6, [1, 1, 1, 1, 1, 1], n=10),
        _upd(2, [0.0] * 6, [1, 0, 0, 0, 0, 1], n=1),
    ]
    # votes (cap = median 5.5): [6.5, 5.5, 5.5, 5.5, 5.5, 6.5]; k = 3: 0, 5, then 2 (previous).
    m = robust_consensus_mask(ups, {"w": 0.5}, prev)
    assert m["w"].nonzero().flatten().tolist() == [0, 2, 5]
    m = robust_consensus_mask(ups, {"w": 4 / 6}, {"w": torch.zeros(6, dtype=torch.bool)})
    assert m["w"].nonzero().flatten().tolist() == [0, 1, 2, 5]
    with pytest.raises(ValueError, match="previous mask"):
        robust_consensus_mask(ups, {"w": 0.5}, {})


def test_strategy_takes_the_vote_and_options() -> None:
    from strategies.aggregation.strategy import SparseFedAvg

    opts = MergeOptions(num_malicious=1)
    s = SparseFedAvg(merge_rule="bulyan", merge_options=opts, vote="robust")
    assert s.vote_name == "robust" and s.rule.fn == robust.Bulyan(1, 3)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="aggregation.vote = 'loudest': unknown vote rule"):
        SparseFedAvg(vote="loudest")


def test_multikrum_capped_weights_ignore_inflated_examples() -> None:
    prev = {"w": torch.zeros(1)}
    ups = [_upd(i, [v], [1], n=10) for i, v in enumerate([1.0, 1.01, 1.02, 1.04])]
    ups.append(_upd(9, [1.015], [1], n=10**6))  # central, so Krum selects it
    selected = robust.select_multikrum(ups, prev, 1, 4)
    assert any(u.node_id == 9 for u in selected)
    plain = robust.MultiKrum(num_malicious=1)(ups, prev)["w"].item()
    capped = robust.MultiKrum(num_malicious=1, cap_weights=True)(ups, prev)["w"].item()
    assert abs(plain - 1.015) < 1e-4  # the inflated count dominates Flower's weighted average
    mean = sum(u.values["w"].item() for u in selected) / 4
    assert abs(capped - mean) < 1e-6 and abs(capped - 1.015) > 1e-3  # capped at 10: plain mean
    opts = MergeOptions(num_malicious=1, cap_weights=True)
    assert get_merge_rule("multi-krum", options=opts) == robust.MultiKrum(1, 0, True)
