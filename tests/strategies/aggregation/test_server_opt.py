"""Server optimizers on the rule API vs Flower's own strategies (all-ones masks), mask-awareness."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as flwr_strategy

from strategies.aggregation.merge import ClientUpdate
from strategies.aggregation.rules import RoundInput, build_rule
from tests.strategies.aggregation.test_strategy import FakeGrid, _task_identity  # noqa: F401

SHAPES = {"w": (3, 4), "b": (4,)}
NODES = [11, 12, 13]

CASES = [
    (
        "fedavgm",
        {"server-learning-rate": 0.7, "server-momentum": 0.9},
        lambda: flwr_strategy.FedAvgM(server_learning_rate=0.7, server_momentum=0.9),
    ),
    (
        "fedadagrad",
        {"eta": 0.05, "tau": 1e-3},
        lambda: flwr_strategy.FedAdagrad(eta=0.05, tau=1e-3),
    ),
    (
        "fedadam",
        {"eta": 0.05, "beta-1": 0.8, "beta-2": 0.95},
        lambda: flwr_strategy.FedAdam(eta=0.05, beta_1=0.8, beta_2=0.95),
    ),
    ("fedyogi", {}, lambda: flwr_strategy.FedYogi()),
    (
        "qfedavg",
        {"client-learning-rate": 0.1, "q": 0.5},
        lambda: flwr_strategy.QFedAvg(client_learning_rate=0.1, q=0.5),
    ),
]


def _client_values(prev: dict[str, torch.Tensor], rnd: int, i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * rnd + i)
    return {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in prev.items()}


def _loss(rnd: int, i: int) -> float:
    return 0.5 + 0.25 * i + 0.1 * rnd


@pytest.mark.parametrize(("name", "options", "flower"), CASES, ids=[c[0] for c in CASES])
def test_matches_flower_with_all_ones_masks(name: str, options: dict, flower) -> None:
    g = torch.Generator().manual_seed(0)
    init = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    ref = flower()
    grid = FakeGrid(NODES, lambda msg, held: msg)
    ref_arrays = ArrayRecord({k: v.clone() for k, v in init.items()})
    rule = build_rule(name, options)
    ours = {k: v.clone() for k, v in init.items()}
    ones = {"w": torch.ones(SHAPES["w"], dtype=torch.bool)}  # "b" absent = dense key
    for rnd in (1, 2, 3):
        msgs = list(ref.configure_train(rnd, ref_arrays, ConfigRecord(), grid))
        prev_ref = {k: torch.as_tensor(v.numpy()) for k, v in ref_arrays.items()}
        replies = []
        for i, msg in enumerate(msgs):
            vals = _client_values(prev_ref, rnd, i)
            metrics = MetricRecord({"num-examples": 10 * (i + 1), "train_loss": _loss(rnd, i)})
            content = RecordDict({"arrays": ArrayRecord(vals), "metrics": metrics})
            replies.append(Message(content, reply_to=msg))
        ref_arrays, _ = ref.aggregate_train(rnd, replies)
        updates = [
            ClientUpdate(
                n, _client_values(ours, rnd, i), ones, 10 * (i + 1), {"train_loss": _loss(rnd, i)}
            )
            for i, n in enumerate(NODES)
        ]
        ours = rule.aggregate(RoundInput(rnd, ones, ours, updates))
        for k in SHAPES:
            want = torch.as_tensor(ref_arrays[k].numpy()).double()
            assert torch.allclose(ours[k].double(), want, atol=2e-5, rtol=1e-5), (name, rnd, k)


def test_state_round_trips_and_resumes_identically() -> None:
    g = torch.Generator().manual_seed(1)
    prev = {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g)}
    mask = {"w": torch.ones(3, 4, dtype=torch.bool)}
    a, b = build_rule("fedadam"), build_rule("fedadam")

    def ups(rnd: int, p: dict) -> list[ClientUpdate]:
        return [ClientUpdate(n, _client_values(p, rnd, n), mask, 5) for n in (1, 2)]

    pa = a.aggregate(RoundInput(1, mask, prev, ups(1, prev)))
    b.load_state_dict(a.state_dict())  # what a checkpoint carries
    assert torch.equal(
        a.aggregate(RoundInput(2, mask, pa, ups(2, pa)))["w"],
        b.aggregate(RoundInput(2, mask, pa, ups(2, pa)))["w"],
    )
    with pytest.raises(ValueError, match="unknown state"):
        b.load_state_dict({"nope": {}})


def test_mask_aware_uncovered_kept_and_off_mask_state_reset() -> None:
    prev = {"w": torch.tensor([1.0, 2.0, 0.0])}
    consensus = {"w": torch.tensor([True, True, False])}
    client_mask = {"w": torch.tensor([True, False, False])}  # nobody keeps w[1] or w[2]
    rule = build_rule("fedadam", {"eta": 0.1})
    ups = [ClientUpdate(1, {"w": torch.tensor([3.0, 0.0, 0.0])}, client_mask, 4)]
    out = rule.aggregate(RoundInput(1, consensus, prev, ups))["w"]
    assert out[0] > 1.0 and out[1] == 2.0 and out[2] == 0.0  # uncovered coordinates unchanged
    m = rule.state_dict()["m"]["w"]
    assert m[0] > 0 and m[1] == 0 and m[2] == 0


def test_qfedavg_needs_the_loss_and_options_are_checked() -> None:
    rule = build_rule("qfedavg", {"client-learning-rate": 0.1})
    prev = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="train_loss"):
        rule.aggregate(RoundInput(1, {}, prev, [ClientUpdate(1, {"w": torch.ones(2)}, {}, 1)]))
    with pytest.raises(ValueError, match="does not accept options"):
        build_rule("fedadam", {"momentum": 0.9})
    with pytest.raises(ValueError, match=r"beta-1 = 'x': expected float"):
        build_rule("fedadam", {"beta-1": "x"})
