"""Validation inside both strategies: the first reply is the one used, merged models are
checked, the dense baseline survives clients whose metric keys differ, rejections are kept."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from server.recorder import StoreRecorder
from server.runner import RoundRecord
from server.store import RunStore
from simulations.fuzz_campaign import Federation, task_identity
from simulations.hostile import honest_evaluate_reply, honest_train
from strategies.aggregation.merge import ClientUpdate
from strategies.aggregation.rules import as_rule


@pytest.fixture(autouse=True)
def _identity():  # type: ignore[no-untyped-def]
    with task_identity():
        yield


def _train_round(fed: Federation, edit=None):  # type: ignore[no-untyped-def]
    """One train round's instructions and honest (values, reply) per node, optionally edited."""
    fed.round += 1
    rng = random.Random(fed.round)
    msgs = list(fed.strategy.configure_train(fed.round, fed.arrays, ConfigRecord(), fed.grid))
    ctxs = [honest_train(fed.kind, m, fed.held[int(m.metadata.dst_node_id)], rng) for m in msgs]
    return msgs, ctxs


def test_first_reply_of_a_node_is_used_update_and_metrics() -> None:
    fed = Federation("sparse", 0)
    _, ctxs = _train_round(fed)
    first, second = (
        ctxs[0].reply(),
        ctxs[0].reply(
            ctxs[0].arrays({k: v * 1.5 for k, v in ctxs[0].values.items()}),
            {**ctxs[0].metrics, "num-examples": 7, "train_loss": 2.5},
        ),
    )
    replies = [first, second] + [c.reply() for c in ctxs[1:]]
    twin = Federation("sparse", 0)
    _train_round(twin)
    arrays, metrics = fed.strategy.aggregate_train(fed.round, replies)
    ref, ref_metrics = twin.strategy.aggregate_train(twin.round, [first] + replies[2:])
    assert arrays is not None and ref is not None and metrics is not None
    got, want = arrays.to_torch_state_dict(), ref.to_torch_state_dict()
    assert all(torch.equal(got[k], want[k]) for k in got)
    assert metrics["train_loss"] == ref_metrics["train_loss"]  # type: ignore[index]
    rows = fed.strategy.round_clients[fed.round]
    node = int(first.metadata.src_node_id)
    mine = [r for r in rows if r["node_id"] == node]
    assert [r["accepted"] for r in mine] == [True, False]
    assert (
        mine[0]["metrics"] == ctxs[0].metrics | {}
        or mine[0]["metrics"]["num-examples"] == (ctxs[0].metrics["num-examples"])
    )
    assert "duplicate" in str(mine[1]["reason"])


def test_non_finite_merge_rejects_the_round_and_keeps_the_model() -> None:
    fed = Federation("sparse", 1)

    def exploding(updates: list[ClientUpdate], previous: dict) -> dict:
        return {k: v + float("inf") for k, v in previous.items()}

    fed.strategy.rule = as_rule(exploding)
    _, ctxs = _train_round(fed)
    arrays, metrics = fed.strategy.aggregate_train(fed.round, [c.reply() for c in ctxs])
    assert arrays is None and metrics is not None and metrics["round_rejected"] == 1
    events = fed.strategy.round_events[fed.round]
    assert events[0]["kind"] == "round_rejected"
    assert "not finite" in str(events[0]["detail"]["reason"])  # type: ignore[index]
    assert fed.strategy.mask_version == 0  # no mask vote on a rejected round


def test_dense_baseline_survives_differing_metric_keys() -> None:
    fed = Federation("dense", 2)
    msgs, ctxs = _train_round(fed)
    replies = []
    for i, c in enumerate(ctxs):
        metrics = dict(c.metrics)
        if i == 0:
            metrics["my_own_metric"] = 1.0  # unknown: dropped
        if i == 1:
            del metrics["train_loss"]  # optional known key missing: averaged without it
        replies.append(c.reply(metrics=metrics))
    arrays, metrics = fed.strategy.aggregate_train(fed.round, replies)
    assert arrays is not None and metrics is not None
    assert "train_loss" not in metrics and "my_own_metric" not in metrics
    assert metrics["num_accepted"] == len(ctxs)
    # Flower's FedAvg maths: the examples-weighted mean of the clients' arrays.
    n = torch.tensor([float(c.metrics["num-examples"]) for c in ctxs], dtype=torch.float64)
    for k, v in arrays.to_torch_state_dict().items():
        stacked = torch.stack([c.values[k].to(torch.float64) for c in ctxs])
        want = (stacked * (n / n.sum()).view(-1, *[1] * (stacked.dim() - 1))).sum(0)
        assert torch.allclose(v.to(torch.float64), want, atol=1e-5)


def test_evaluate_replies_checked_and_recorded(tmp_path: Path) -> None:
    fed = Federation("sparse", 3)
    _, ctxs = _train_round(fed)
    arrays, _ = fed.strategy.aggregate_train(fed.round, [c.reply() for c in ctxs])
    assert arrays is not None
    ev = list(fed.strategy.configure_evaluate(fed.round, arrays, ConfigRecord(), fed.grid))
    rng = random.Random(0)
    good = [honest_evaluate_reply(m, rng) for m in ev[2:]]
    bad = [
        Message(
            RecordDict({"metrics": MetricRecord({"num-examples": 3, "eval_acc": 7.0})}),
            reply_to=ev[0],
        ),
        Message(Error(code=2, reason="evaluation crashed"), reply_to=ev[1]),
    ]
    result = fed.strategy.aggregate_evaluate(fed.round, bad + good)
    assert result is not None
    accs = [float(r.content.metric_records["metrics"]["eval_acc"]) for r in good]
    ns = [int(r.content.metric_records["metrics"]["num-examples"]) for r in good]
    assert result["eval_acc"] == pytest.approx(
        sum(a * n for a, n in zip(accs, ns, strict=True)) / sum(ns)
    )
    events = fed.strategy.round_events[fed.round]
    assert [e["kind"] for e in events] == ["reply_rejected", "reply_rejected"]
    assert "'eval_acc' must be in [0, 1]" in str(events[0]["detail"]["reason"])  # type: ignore[index]
    # The recorder stores them as events of the round, with their reasons.
    store = RunStore(f"sqlite:///{tmp_path / 'runs.db'}")
    try:
        run_id = store.create_run({"strategy": "sparse"}, seed=0)
        rec = RoundRecord(fed.round, 0.5, 1.0, 1.0, 10, 10, 0.1, 0.5)
        StoreRecorder(store, run_id)(rec, fed.strategy, arrays)
        stored = [e for e in store.get_events(run_id) if e.kind == "reply_rejected"]
        assert len(stored) == 2 and "evaluation crashed" in str(stored[1].detail)
        rows = store.get_client_results(run_id, fed.round)
        assert len(rows) == len(ctxs) and all(r.accepted for r in rows)
    finally:
        store.close()


def test_server_knows_simulated_partition_sizes() -> None:
    from client.app import app
    from client.data import local_data
    from server.runner import _dataset, known_partition_sizes
    from simulations.grid import InProcessGrid
    from tasks.config import LeanfedConfig

    cfg = LeanfedConfig(num_partitions=4)
    grid = InProcessGrid(app, 4, cfg.to_run_config())
    sizes = known_partition_sizes(grid, cfg, _dataset(cfg.dataset, cfg.seed))
    assert sorted(sizes) == sorted(grid.node_ids)
    for node, n in sizes.items():
        assert n == len(local_data(cfg, dict(grid.contexts[node].node_config)).y)
    assert known_partition_sizes(grid, cfg.replace(cl_scenario="split-mnist"), None) == {}  # type: ignore[arg-type]
