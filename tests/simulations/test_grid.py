"""The embedded engine: worker pools give bit-identical runs, same bytes, small idle nodes."""

from __future__ import annotations

import hashlib

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from server.runner import RunSummary, run_federated
from simulations.grid import InProcessGrid
from simulations.pool import from_bytes
from tasks.config import LeanfedConfig

TINY = LeanfedConfig(
    num_server_rounds=2,
    dataset="digits",
    model="mlp",
    num_partitions=8,
    fraction_train=0.5,
    min_train_nodes=2,
    local_steps=3,
    local_batch_size=16,
    dst_density=0.2,
    seed=3,
)


def _sha(state: dict[str, torch.Tensor] | None) -> str:
    assert state is not None
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].numpy().tobytes())
    return h.hexdigest()


def _run(workers: int) -> tuple[RunSummary, InProcessGrid]:
    with InProcessGrid(
        "client.app:app", TINY.num_partitions, run_config=TINY.to_run_config(), workers=workers
    ) as grid:
        return run_federated(grid, TINY), grid


def test_one_and_two_workers_give_bit_identical_runs_and_bytes() -> None:
    one, g1 = _run(1)
    two, g2 = _run(2)
    assert _sha(one.final_state) == _sha(two.final_state)
    assert [(r.accuracy, r.loss, r.upload_bytes, r.download_bytes) for r in one.rounds] == [
        (r.accuracy, r.loss, r.upload_bytes, r.download_bytes) for r in two.rounds
    ]
    assert [r.metrics for r in one.rounds] == [r.metrics for r in two.rounds]
    assert g1.traffic == g2.traffic and sum(g1.traffic.received.values()) > 0
    # Every node's state after the run is the same, byte for byte.
    assert all(g1.state_bytes(n) == g2.state_bytes(n) for n in g1.node_ids)

    # The sequential in-process path computes the same when torch also uses one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        zero, g0 = _run(0)
    finally:
        torch.set_num_threads(threads)
    assert _sha(zero.final_state) == _sha(one.final_state)
    assert g0.traffic == g1.traffic


def test_idle_nodes_hold_no_state_and_trained_nodes_only_their_mask() -> None:
    summary, grid = _run(0)
    assert summary.final_state is not None
    n_weights = sum(v.numel() for k, v in summary.final_state.items() if v.dim() > 1)
    held = {n: grid.state_bytes(n) for n in grid.node_ids}
    trained = [n for n, b in held.items() if b]
    # 4 of 8 nodes sampled per round for 2 rounds: the rest never ran and hold nothing.
    assert 4 <= len(trained) <= 8
    assert all(b == b"" for n, b in held.items() if n not in trained)
    for n in trained:
        # The packed global mask (1 bit per weight) plus shapes and names: no model, no data.
        assert n_weights // 8 <= len(held[n]) <= n_weights // 8 + 512
        rec = grid.contexts[n].state.config_records["leanfed"]
        assert set(rec["names"]) == {k for k, v in summary.final_state.items() if v.dim() > 1}  # type: ignore[arg-type]


counter_app = ClientApp()


@counter_app.train()
def _count(msg: Message, context: Context) -> Message:
    seen = int(context.state.config_records.get("c", ConfigRecord({"n": 0}))["n"]) + 1  # type: ignore[arg-type]
    context.state.config_records["c"] = ConfigRecord({"n": seen})
    if msg.content.config_records["config"].get("fail"):
        raise ValueError("asked to fail")
    return Message(RecordDict({"out": ConfigRecord({"n": seen})}), reply_to=msg)


def _msg(grid: InProcessGrid, node: int, fail: bool = False) -> Message:
    content = RecordDict({"config": ConfigRecord({"fail": fail})})
    return grid.create_message(content, "train", node, "1")


def test_two_messages_to_one_node_in_one_push_see_each_others_state() -> None:
    grid = InProcessGrid(counter_app, 3)
    a, b = grid.node_ids[:2]
    replies = list(grid.send_and_receive([_msg(grid, a), _msg(grid, a), _msg(grid, b)]))
    assert [int(r.content.config_records["out"]["n"]) for r in replies] == [1, 2, 1]  # type: ignore[arg-type]
    assert [r.metadata.src_node_id for r in replies] == [a, a, b]
    assert from_bytes(grid.state_bytes(a)).config_records["c"]["n"] == 2


def test_a_raising_client_is_an_error_reply_and_keeps_its_state_change() -> None:
    grid = InProcessGrid(counter_app, 2)
    node = grid.node_ids[0]
    (reply,) = grid.send_and_receive([_msg(grid, node, fail=True)])
    assert reply.has_error() and "asked to fail" in reply.error.reason
    assert grid.contexts[node].state.config_records["c"]["n"] == 1  # as Flower's ClientApp process
    assert sum(grid.traffic.received.values()) == 0  # no reply content came back


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="workers"):
        InProcessGrid(counter_app, 2, workers=1)  # a pool needs an import reference
    with pytest.raises(ValueError, match="module:attr"):
        InProcessGrid("client.app", 2, workers=1)
    with pytest.raises(ValueError, match="not a flwr ClientApp"):
        InProcessGrid("tasks.config:LeanfedConfig", 2)
    with pytest.raises(ValueError, match="workers must be >= 0"):
        InProcessGrid(counter_app, 2, workers=-1)


DROPOUT = TINY.replace(
    model="transformer",
    num_server_rounds=2,
    local_steps=2,
    local_batch_size=8,
    plugin_options=(
        ("model", "d-model", 8),
        ("model", "nhead", 2),
        ("model", "num-layers", 1),
    ),
)


def test_dropout_draws_depend_on_run_round_and_node_not_on_the_worker() -> None:
    # Dropout draws from the process RNG: without a per-(seed, round, node) seed, a node's
    # draws depend on which clients its worker ran before (and a resumed run differs).
    def run(workers: int) -> str:
        with InProcessGrid(
            "client.app:app",
            DROPOUT.num_partitions,
            run_config=DROPOUT.to_run_config(),
            workers=workers,
        ) as grid:
            return _sha(run_federated(grid, DROPOUT).final_state)

    assert run(1) == run(2)
