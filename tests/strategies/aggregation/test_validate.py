"""Reply validation: each kind of bad reply is dropped with a reason; the mean ignores them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from strategies import codec
from strategies.aggregation.merge import ClientUpdate, masked_weighted_mean
from strategies.aggregation.validate import ModelSpec, check_update, validate_replies
from strategies.aggregation.wire import decode_reply

STATE = {"w": torch.zeros(2, 4), "b": torch.zeros(4)}
MASK = {"w": torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)}  # density 0.25
SPEC = ModelSpec.from_state(STATE, MASK, max_density=0.25, tolerance=0.05)


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    # Flower sets these when a ServerApp starts; instruction Messages need them.
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _instruction(node: int) -> Message:
    return Message(RecordDict(), node, MessageType.TRAIN)


def _reply(node: int, arrays: ArrayRecord, n: object = 10) -> Message:
    metrics = MetricRecord({"num-examples": n, "train_loss": 0.5})  # type: ignore[dict-item]
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=_instruction(node))


def _good_values(v: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2, 4), v) * MASK["w"], "b": torch.full((4,), v)}


def _payload(values: dict, mask: dict | None = MASK, **kw: object) -> ArrayRecord:
    return codec.to_arrayrecord(codec.encode(values, mask, **kw))  # type: ignore[arg-type]


def test_bad_replies_are_rejected_with_reasons() -> None:
    nan_vals = _good_values(1.0)
    nan_vals["b"][0] = float("nan")
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
        Message(Error(code=2, reason="boom"), reply_to=_instruction(11)),
        _reply(12, _payload(_good_values(1.0), None)),  # sparsified key sent dense
        _reply(13, ArrayRecord({"w": Array(np.zeros(3, np.float32))})),
    ]
    accepted, rejected = validate_replies(replies, SPEC, lambda m: decode_reply(m, MASK))
    assert [u.node_id for u in accepted] == [1, 2]
    reasons = dict(rejected)
    assert sorted(reasons) == [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    assert "NaN" in reasons[3]
    assert "shape" in reasons[4]
    assert "missing ['b']" in reasons[5]
    assert "density" in reasons[6]
    assert "payload integrity" in reasons[7]
    assert "num-examples" in reasons[8] and "num-examples" in reasons[9]
    assert "dtype" in reasons[10]
    assert "boom" in reasons[11]
    assert "mask key set" in reasons[12]
    assert "leanfed.payload" in reasons[13]
    out = masked_weighted_mean(accepted, STATE)
    # (1 * 10 + 3 * 30) / 40 = 2.5 under the mask, previous (0) elsewhere.
    assert out["w"].tolist() == [[2.5, 2.5, 0, 0], [0, 0, 0, 0]]
    assert out["b"].tolist() == [2.5] * 4


def test_send_mask_false_reply_uses_the_sent_mask() -> None:
    reply = _reply(1, _payload(_good_values(2.0), send_mask=False))
    accepted, rejected = validate_replies([reply], SPEC, lambda m: decode_reply(m, MASK))
    assert not rejected and torch.equal(accepted[0].mask["w"], MASK["w"])
    accepted, rejected = validate_replies([reply], SPEC, lambda m: decode_reply(m, None))
    assert not accepted and "previous mask" in rejected[0][1]


def test_duplicate_node_and_off_mask_values() -> None:
    r1 = _reply(1, _payload(_good_values(1.0)))
    accepted, rejected = validate_replies([r1, r1], SPEC, lambda m: decode_reply(m, MASK))
    assert len(accepted) == 1 and "duplicate" in rejected[0][1]
    upd = ClientUpdate(1, {"w": torch.ones(2, 4), "b": torch.ones(4)}, dict(MASK), 3)
    assert "outside the mask" in str(check_update(upd, SPEC))
    upd = ClientUpdate(1, _good_values(1.0), dict(MASK), 3)
    assert check_update(upd, SPEC) is None
