"""Reply validation: each kind of bad reply is dropped with a reason; the mean ignores them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from strategies import codec
from strategies.aggregation.merge import ClientUpdate, masked_weighted_mean
from strategies.aggregation.metric_rules import check_metrics
from strategies.aggregation.validate import (
    ModelSpec,
    NormBound,
    ReplyLimits,
    check_update,
    validate_replies,
)
from strategies.aggregation.wire import decode_payload

STATE = {"w": torch.zeros(2, 4), "b": torch.zeros(4)}
MASK = {"w": torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)}  # density 0.25
SPEC = ModelSpec.from_state(STATE, MASK, max_density=0.25, tolerance=0.05)
WIRE = SPEC.wire()
LIMITS = ReplyLimits()


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    # Flower sets these when a ServerApp starts; instruction Messages need them.
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _instruction(node: int) -> Message:
    return Message(RecordDict(), node, MessageType.TRAIN)


def _reply(
    node: int, arrays: ArrayRecord, n: object = 10, loss: float = 0.5, extra: dict | None = None
) -> Message:
    metrics = MetricRecord({"num-examples": n, "train_loss": loss, **(extra or {})})  # type: ignore[dict-item]
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=_instruction(node))


def _good_values(v: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2, 4), v) * MASK["w"], "b": torch.full((4,), v)}


def _payload(values: dict, mask: dict | None = MASK, **kw: object) -> ArrayRecord:
    return codec.to_arrayrecord(codec.encode(values, mask, **kw))  # type: ignore[arg-type]


def _check(replies: list[Message], limits: ReplyLimits = LIMITS, mask: dict | None = MASK):
    sent = {int(m.metadata.src_node_id) for m in replies} - {99}
    return validate_replies(
        replies, sent, lambda m: decode_payload(m, mask, WIRE), SPEC, STATE, limits, NormBound()
    )


def test_bad_replies_are_rejected_with_reasons() -> None:
    nan_vals = _good_values(1.0)
    nan_vals["b"][0] = float("nan")
    big = _good_values(1.0)
    big["b"][1] = 2e6
    dense_mask = {"w": torch.ones(2, 4, dtype=torch.bool)}
    garbage = ArrayRecord({codec.PAYLOAD_KEY: Array(np.frombuffer(b"LFD1garbage!", np.uint8))})
    replies = [
        _reply(1, _payload(_good_values(1.0)), n=10),
        _reply(2, _payload(_good_values(3.0)), n=30),
        _reply(3, _payload(nan_vals)),
        _reply(4, _payload({"w": torch.zeros(2, 4), "b": torch.zeros(5)})),
        _reply(5, _payload({"w": torch.zeros(2, 4)})),
        _reply(6, _payload(_good_values(1.0), dense_mask)),
        _reply(7, garbage),
        _reply(8, _payload(_good_values(1.0)), n=0),
        _reply(9, _payload(_good_values(1.0)), n=2.5),
        _reply(10, _payload({"w": torch.zeros(2, 4, dtype=torch.float64), "b": torch.zeros(4)})),
        Message(Error(code=2, reason="boom\n" + "x" * 500), reply_to=_instruction(11)),
        _reply(12, _payload(_good_values(1.0), None)),  # sparsified key sent dense
        _reply(13, ArrayRecord({"w": Array(np.zeros(3, np.float32))})),
        _reply(14, _payload(big)),
        _reply(15, _payload(_good_values(1.0)), n=10**7),
        _reply(16, _payload(_good_values(1.0)), loss=float("inf")),
        _reply(17, _payload(_good_values(1.0)), n=-3),
        _reply(99, _payload(_good_values(1.0))),  # never sent a message
    ]
    accepted, verdicts = _check(replies)
    assert [u.node_id for u in accepted] == [1, 2]
    assert [v.node_id for v in verdicts] == [int(m.metadata.src_node_id) for m in replies]
    reasons = {v.node_id: str(v.reason) for v in verdicts if not v.accepted}
    assert sorted(reasons) == [*range(3, 18), 99]
    assert "NaN" in reasons[3]
    assert "shape" in reasons[4]
    assert "16 tensors" not in reasons[5] and "payload holds 1 tensors" in reasons[5]
    assert "layer density 1.0000" in reasons[6]
    assert "CRC" in reasons[7] or "truncated" in reasons[7] or "header" in reasons[7]
    assert "'num-examples'" in reasons[8] and "must be an int" in reasons[9]
    assert "value code" in reasons[10]
    assert reasons[11].startswith("error reply (code 2): boom?xxx") and len(reasons[11]) < 160
    assert "sent without a mask" in reasons[12]
    assert "leanfed.payload" in reasons[13]
    assert "exceeds bound 1e+06" in reasons[14]
    assert "exceeds the cap 1000000" in reasons[15]
    assert "'train_loss' must be finite" in reasons[16]
    assert "'num-examples' must be in [1," in reasons[17]
    assert "not sent" in reasons[99]
    out = masked_weighted_mean(accepted, STATE)
    # (1 * 10 + 3 * 30) / 40 = 2.5 under the mask, previous (0) elsewhere.
    assert out["w"].tolist() == [[2.5, 2.5, 0, 0], [0, 0, 0, 0]]
    assert out["b"].tolist() == [2.5] * 4


def test_metric_rule_keeps_known_drops_unknown_and_caps_by_partition() -> None:
    r = _reply(1, _payload(_good_values(1.0)), n=10, extra={"my_metric": 3.0, "drift": 1})
    accepted, verdicts = _check([r])
    assert verdicts[0].metrics == {"num-examples": 10, "train_loss": 0.5, "drift": 1}
    assert accepted[0].metrics == verdicts[0].metrics and accepted[0].num_examples == 10
    bad = _reply(2, _payload(_good_values(1.0)), extra={"drift": 2})
    assert "'drift' must be in [0, 1]" in str(_check([bad])[1][0].reason)
    sized = ReplyLimits(partition_sizes={1: 9})
    assert "exceeds the cap 9" in str(_check([r], sized)[1][0].reason)
    metrics, problem = check_metrics("evaluate", {"num-examples": 3, "task_acc.2": 0.5}, 10)
    assert problem is None and metrics == {"num-examples": 3, "task_acc.2": 0.5}
    _, problem = check_metrics("evaluate", {"num-examples": 3, "eval_acc": 1.5}, 10)
    assert "'eval_acc' must be in [0, 1]" in str(problem)
    _, problem = check_metrics("train", {"num-examples": 2**80}, 10)
    assert "'num-examples' must be in" in str(problem)
    _, problem = check_metrics("train", {"num-examples": True}, 10)
    assert "must be a scalar int, got bool" in str(problem)


def test_send_mask_false_reply_uses_the_sent_mask() -> None:
    reply = _reply(1, _payload(_good_values(2.0), send_mask=False))
    accepted, verdicts = _check([reply])
    assert verdicts[0].accepted and torch.equal(accepted[0].mask["w"], MASK["w"])
    accepted, verdicts = _check([reply], mask=None)
    assert not accepted and "previous mask" in str(verdicts[0].reason)


def test_first_reply_of_a_node_is_the_one_used() -> None:
    r1 = _reply(1, _payload(_good_values(1.0)), n=10)
    r2 = _reply(1, _payload(_good_values(5.0)), n=50)
    accepted, verdicts = _check([r1, r2])
    assert len(accepted) == 1 and accepted[0].num_examples == 10
    assert float(accepted[0].values["b"][0]) == 1.0 and verdicts[0].metrics["num-examples"] == 10
    assert not verdicts[1].accepted and "duplicate" in str(verdicts[1].reason)
    err = Message(Error(code=2, reason="x"), reply_to=_instruction(1))
    accepted, verdicts = _check([err, r2])  # an error reply counts as the node's reply
    assert not accepted and "duplicate" in str(verdicts[1].reason)


def test_off_mask_values_and_per_layer_density() -> None:
    upd = ClientUpdate(1, {"w": torch.ones(2, 4), "b": torch.ones(4)}, dict(MASK), 3)
    assert "outside the mask" in str(check_update(upd, SPEC))
    upd = ClientUpdate(1, _good_values(1.0), dict(MASK), 3)
    assert check_update(upd, SPEC) is None
    two = {"a": torch.zeros(10), "c": torch.zeros(10)}
    spec = ModelSpec.from_state(two, {"a": 0, "c": 0}, 0.5, 0.0, {"a": 0.2, "c": 0.8})  # type: ignore[dict-item]
    m = {"a": torch.arange(10) < 5, "c": torch.arange(10) < 5}  # overall 0.5, a at 0.5
    assert "'a': layer density 0.5000" in str(check_update(ClientUpdate(1, two, m, 1), spec))


def test_norm_bound_follows_the_running_median() -> None:
    bound = NormBound(factor=10.0)
    assert bound.limit([]) is None
    assert bound.limit([1.0, 2.0, 3.0, 1000.0]) == pytest.approx(25.0)
    bound.record([1.0, 2.0, 3.0])
    assert bound.limit([30.0]) == pytest.approx(25.0)  # median of 1, 2, 3, 30
    assert NormBound(10.0, max_norm=4.0).limit([1.0]) == 4.0
    assert NormBound(0.0).limit([1.0]) is None
    replies = [_reply(n, _payload(_good_values(0.1 * n))) for n in range(1, 6)]
    replies.append(_reply(6, _payload(_good_values(100.0))))
    accepted, verdicts = _check(replies)
    assert [u.node_id for u in accepted] == [1, 2, 3, 4, 5]
    assert "update norm" in str(verdicts[5].reason) and "exceeds bound" in str(verdicts[5].reason)
