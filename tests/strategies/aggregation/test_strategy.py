"""SparseFedAvg hooks: message format, mask sent only when needed, bytes, rejections, start()."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from strategies import codec
from strategies.aggregation.merge import ClientUpdate, masked_weighted_mean
from strategies.aggregation.strategy import SparseFedAvg

SHAPES = {"fc1.weight": (6, 8), "fc1.bias": (6,), "fc2.weight": (3, 6), "fc2.bias": (3,)}
SPARSE = ["fc1.weight", "fc2.weight"]


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    # Flower sets these when a ServerApp starts; instruction Messages need them.
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _initial() -> ArrayRecord:
    g = torch.Generator().manual_seed(0)
    return ArrayRecord({k: torch.randn(*s, generator=g) for k, s in SHAPES.items()})


Handler = Callable[[Message, dict], Message]


class FakeGrid(Grid):
    """Minimal Grid: each message is answered synchronously by a per-node Python handler."""

    def __init__(self, nodes: list[int], handler: Handler) -> None:
        self.nodes = nodes
        self.handler = handler
        self.held: dict[int, dict] = {n: {} for n in nodes}  # per-node client state
        self.sent: list[Message] = []

    def set_run(self, run: object) -> None:
        pass

    @property
    def run(self) -> object:  # type: ignore[override]
        return None

    def create_message(self, *args: object, **kwargs: object) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        out = []
        for msg in messages:
            self.sent.append(msg)
            out.append(self.handler(msg, self.held[msg.metadata.dst_node_id]))
        return out


def _client(delta: dict[int, float], regrow_nodes: frozenset[int] = frozenset()) -> Handler:
    """A fake ClientApp: decode like the real one, add `delta[node]` under its mask, reply."""

    def handle(msg: Message, held: dict) -> Message:
        node = msg.metadata.dst_node_id
        payload = codec.from_arrayrecord(msg.content.array_records["arrays"])
        values, mask = codec.decode_with(payload, held.get("mask"))
        held["mask"] = mask
        held.setdefault("log", []).append(dict(msg.content.config_records["config"]))
        if msg.metadata.message_type.startswith("evaluate"):
            return Message(
                RecordDict({"metrics": MetricRecord({"num-examples": 5, "eval_acc": 0.5})}),
                reply_to=msg,
            )
        my_mask = {k: m.clone() for k, m in mask.items()}
        regrew = node in regrow_nodes
        if regrew:  # move one active entry of fc1.weight elsewhere (same count)
            flat = my_mask["fc1.weight"].view(-1)
            on, off = flat.nonzero().flatten(), (~flat).nonzero().flatten()
            flat[on[0]], flat[off[0]] = False, True
        new = {k: v + delta[node] for k, v in values.items()}
        new = {k: v * my_mask[k] if k in my_mask else v for k, v in new.items()}
        enc = codec.encode(new, my_mask, send_mask=regrew)
        metrics = MetricRecord(
            {
                "num-examples": 10 * node,
                "train_loss": 1.0,
                "density": 0.5,
                "upload_bytes": len(enc),
                "drift": 0,
                "regrew": int(regrew),
            }
        )
        arrays = codec.to_arrayrecord(enc)
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    return handle


def _strategy(**kw: object) -> SparseFedAvg:
    args: dict = dict(
        density=0.5,
        distribution="uniform",
        sparse_keys=SPARSE,
        fraction_evaluate=1.0,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=1,
        seed=3,
    )
    args.update(kw)
    return SparseFedAvg(**args)


def test_configure_train_message_format_and_mask_once() -> None:
    strat = _strategy()
    grid = FakeGrid([1, 2, 3], _client({1: 0.0, 2: 0.0, 3: 0.0}))
    msgs = list(strat.configure_train(1, _initial(), ConfigRecord({"lr": 0.1}), grid))
    assert sorted(m.metadata.dst_node_id for m in msgs) == [1, 2, 3]
    for m in msgs:
        assert set(m.content.array_records) == {"arrays"}
        assert list(m.content.array_records["arrays"]) == [codec.PAYLOAD_KEY]
        cfg = m.content.config_records["config"]
        assert cfg["server-round"] == 1 and cfg["lr"] == 0.1 and cfg["leanfed.mask-sent"] == 1
        values, mask = codec.decode(codec.from_arrayrecord(m.content.array_records["arrays"]))
        assert mask is not None and set(mask) == set(SPARSE)
        for k in SPARSE:  # uniform 0.5: exact count, off-mask zero
            assert int(mask[k].sum()) == round(0.5 * mask[k].numel())
            assert bool((values[k][~mask[k]] == 0).all())
    full = strat.bytes_log[1]["download"]
    replies = grid.send_and_receive(msgs)
    arrays, metrics = strat.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    assert metrics["num_rejected"] == 0 and metrics["num_accepted"] == 3
    # Round 2: every node holds the (unchanged) mask -> values only, smaller download.
    msgs2 = list(strat.configure_train(2, arrays, ConfigRecord(), grid))
    assert all(m.content.config_records["config"]["leanfed.mask-sent"] == 0 for m in msgs2)
    assert strat.bytes_log[2]["download"] < full
    assert strat.bytes_log[1]["upload"] == sum(
        len(codec.from_arrayrecord(r.content.array_records["arrays"])) for r in replies
    )


def test_aggregate_equals_masked_mean_then_masked() -> None:
    strat = _strategy(mask_update_interval=1000)  # mask never re-voted here
    grid = FakeGrid([1, 2], _client({1: 1.0, 2: 4.0}))
    init = _initial()
    msgs = list(strat.configure_train(1, init, ConfigRecord(), grid))
    arrays, _ = strat.aggregate_train(1, grid.send_and_receive(msgs))
    assert arrays is not None and strat.mask is not None
    state = arrays.to_torch_state_dict()
    prev = dict(init.to_torch_state_dict())
    # weights 10 and 20: +1 and +4 -> +3 under the mask; biases dense.
    for k in SPARSE:
        m = strat.mask[k]
        expect = torch.where(m, prev[k] + 3.0, torch.zeros_like(prev[k]))
        assert torch.allclose(state[k], expect, atol=1e-5)
    assert torch.allclose(state["fc1.bias"], prev["fc1.bias"] + 3.0, atol=1e-5)


def test_bad_replies_are_dropped_and_recorded() -> None:
    good = _client({1: 1.0, 2: 1.0, 3: 1.0})

    def handler(msg: Message, held: dict) -> Message:
        reply = good(msg, held)
        if msg.metadata.dst_node_id == 3:  # NaN in a dense bias
            payload = codec.from_arrayrecord(reply.content.array_records["arrays"])
            values, mask = codec.decode_with(payload, held["mask"])
            values["fc2.bias"][0] = float("nan")
            reply.content.array_records["arrays"] = codec.to_arrayrecord(codec.encode(values, mask))
        return reply

    strat = _strategy()
    grid = FakeGrid([1, 2, 3], handler)
    msgs = list(strat.configure_train(4, _initial(), ConfigRecord(), grid))
    arrays, metrics = strat.aggregate_train(4, grid.send_and_receive(msgs))
    assert arrays is not None and metrics is not None
    assert metrics["num_rejected"] == 1 and metrics["num_accepted"] == 2
    assert strat.rejections == [
        {"round": 4, "node_id": 3, "phase": "train", "reason": "'fc2.bias': contains NaN or Inf"}
    ]
    assert all(bool(torch.isfinite(a).all()) for a in arrays.to_torch_state_dict().values())
    rows = {int(str(r["node_id"])): r for r in strat.round_clients[4]}
    assert sorted(rows) == [1, 2, 3]
    assert rows[3]["accepted"] is False and "NaN" in str(rows[3]["reason"])
    assert rows[1]["accepted"] is True and rows[1]["reason"] is None
    assert sum(int(str(r["upload_bytes"])) for r in rows.values()) == strat.bytes_log[4]["upload"]
    assert (
        sum(int(str(r["download_bytes"])) for r in rows.values()) == strat.bytes_log[4]["download"]
    )
    assert rows[2]["metrics"]["num-examples"] == 20  # type: ignore[index]


def test_all_rejected_keeps_model() -> None:
    strat = _strategy()

    def broken(msg: Message, held: dict) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)

    grid = FakeGrid([1, 2], broken)
    msgs = list(strat.configure_train(1, _initial(), ConfigRecord(), grid))
    arrays, metrics = strat.aggregate_train(1, grid.send_and_receive(msgs))
    assert arrays is None and metrics is not None and metrics["num_rejected"] == 2
    with pytest.raises(RuntimeError, match="before configure_train"):
        _strategy().aggregate_train(1, [])


def test_start_runs_rounds_with_regrowth_and_custom_rule() -> None:
    calls: list[int] = []

    def my_rule(updates: list[ClientUpdate], previous: dict) -> dict:
        calls.append(len(updates))
        return masked_weighted_mean(updates, previous)

    strat = _strategy(merge_rule=my_rule, density=0.25)
    grid = FakeGrid([1, 2, 3], _client({1: 0.1, 2: 0.2, 3: 0.3}, regrow_nodes=frozenset({2, 3})))
    seen: list[int] = []

    def evaluate_fn(rnd: int, arrays: ArrayRecord) -> MetricRecord:
        # Dense global model in the loop: every key, full shape.
        sd = arrays.to_torch_state_dict()
        assert {k: tuple(v.shape) for k, v in sd.items()} == SHAPES
        seen.append(rnd)
        return MetricRecord({"acc": 0.0})

    result = strat.start(grid, _initial(), num_rounds=3, evaluate_fn=evaluate_fn)
    assert seen == [0, 1, 2, 3] and calls == [3, 3, 3]
    assert sorted(strat.bytes_log) == [1, 2, 3]
    for rnd in (1, 2, 3):
        row = strat.bytes_log[rnd]
        assert row["upload"] > 0 and row["download"] > 0 and row["download_evaluate"] > 0
        m = result.train_metrics_clientapp[rnd]
        assert m["upload_bytes"] == row["upload"] and m["download_bytes"] == row["download"]
        assert m["num_accepted"] == 3 and m["num_rejected"] == 0
    # Global density stays exact per layer after every consensus vote.
    assert strat.mask is not None
    for k in SPARSE:
        numel = strat.mask[k].numel()
        assert int(strat.mask[k].sum()) == round(strat.target_densities[k] * numel)
    active = sum(int(m.sum()) for m in strat.mask.values())
    assert result.train_metrics_clientapp[3]["density"] == pytest.approx(active / 66)
    final = result.arrays.to_torch_state_dict()
    for k in SPARSE:
        assert bool((final[k][~strat.mask[k]] == 0).all())
    # Client-side mask views always equal the server's after the last message.
    for node in grid.nodes:
        held = grid.held[node]["mask"]
        assert all(torch.equal(held[k], strat.mask[k]) for k in SPARSE)
    # The mask travels only when the node lacks the current version.
    for node in grid.nodes:
        sent_flags = [c["leanfed.mask-sent"] for c in grid.held[node]["log"]]
        versions = [c["leanfed.mask-version"] for c in grid.held[node]["log"]]
        for i, flag in enumerate(sent_flags):
            assert flag == int(i == 0 or versions[i] != versions[i - 1])
    assert not strat.rejections
    # Nodes 2 and 3 (50 of 60 examples) moved the same entry: the vote adopts it.
    changed = [result.train_metrics_clientapp[r]["mask_changed"] for r in (1, 2, 3)]
    assert changed[0] == 1 and strat.mask_version == sum(int(str(c)) for c in changed)


def test_error_reply_resets_node_so_mask_is_resent() -> None:
    good = _client({1: 0.0, 2: 0.0})
    fail = {"on": True}

    def handler(msg: Message, held: dict) -> Message:
        if msg.metadata.dst_node_id == 2 and fail["on"]:
            held.clear()  # node lost its state (restart)
            from flwr.app import Error

            return Message(Error(code=2, reason="crash"), reply_to=msg)
        return good(msg, held)

    strat = _strategy(fraction_evaluate=0.0)
    grid = FakeGrid([1, 2], handler)
    arrays = _initial()
    msgs = list(strat.configure_train(1, arrays, ConfigRecord(), grid))
    new, _ = strat.aggregate_train(1, grid.send_and_receive(msgs))
    assert strat.rejections[0]["node_id"] == 2
    fail["on"] = False
    msgs = list(strat.configure_train(2, new or arrays, ConfigRecord(), grid))
    flags = {
        m.metadata.dst_node_id: m.content.config_records["config"]["leanfed.mask-sent"]
        for m in msgs
    }
    assert flags[2] == 1
    _, metrics = strat.aggregate_train(2, grid.send_and_receive(msgs))
    assert metrics is not None and metrics["num_rejected"] == 0


def test_constructor_validation_and_fedavg_subclass() -> None:
    assert isinstance(_strategy(), FedAvg)
    with pytest.raises(ValueError, match="density"):
        SparseFedAvg(density=0.0)
    with pytest.raises(ValueError, match="upload_dtype"):
        SparseFedAvg(upload_dtype="fp8")
    with pytest.raises(ValueError, match="mask_update_interval"):
        SparseFedAvg(mask_update_interval=0)
    with pytest.raises(ValueError, match="unknown merge rule"):
        SparseFedAvg(merge_rule="nope")


def test_too_dense_reply_is_rejected_unless_bound_raised() -> None:
    good = _client({1: 0.0, 2: 0.0})

    def handler(msg: Message, held: dict) -> Message:
        reply = good(msg, held)
        if msg.metadata.dst_node_id == 2:  # a client that went dense
            payload = codec.from_arrayrecord(reply.content.array_records["arrays"])
            values, _ = codec.decode_with(payload, held["mask"])
            ones = {k: torch.ones(*SHAPES[k], dtype=torch.bool) for k in SPARSE}
            reply.content.array_records["arrays"] = codec.to_arrayrecord(codec.encode(values, ones))
        return reply

    for bound, rejected in ((None, 1), (1.0, 0)):
        strat = _strategy(max_density=bound)
        grid = FakeGrid([1, 2], handler)
        msgs = list(strat.configure_train(1, _initial(), ConfigRecord(), grid))
        _, metrics = strat.aggregate_train(1, grid.send_and_receive(msgs))
        assert metrics is not None and metrics["num_rejected"] == rejected
        if rejected:
            assert "density 1.0000 exceeds bound 0.5000" in str(strat.rejections[0]["reason"])
