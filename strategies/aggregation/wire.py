"""Message <-> ClientUpdate helpers shared by the strategy and (mirrored by) the ClientApp.

Server -> client (train and evaluate), a RecordDict with:
  "arrays": ArrayRecord from `codec.to_arrayrecord` (one uint8 Array under
            ``codec.PAYLOAD_KEY``): the global values under the consensus mask. The mask is
            inside only when this node does not hold it yet (``send_mask``); otherwise the
            client decodes with ``codec.decode_with(payload, mask_it_holds)``.
  "config": ConfigRecord: everything in the run's train/evaluate config plus, set by
            SparseFedAvg: "server-round" (int), "leanfed.mask-sent" (0/1),
            "leanfed.mask-version" (int), "leanfed.density" (float), "leanfed.upload-dtype"
            ("fp32"|"fp16"|"int8"), "leanfed.mask-round" (1 when the server re-votes the
            consensus mask after this round, so it is a good round to prune/regrow locally).
Client -> server (train), a RecordDict with:
  "arrays":  ArrayRecord from `codec.to_arrayrecord` of ``codec.encode(state, client_mask,
             value_dtype=<upload dtype>, send_mask=<client changed its mask>)``; with
             ``send_mask=False`` the client's mask is the one it received this round.
  "metrics": MetricRecord with "num-examples" (int > 0), "train_loss", "density",
             "upload_bytes", "drift" (0/1), "regrew" (0/1), ...: every key is checked by
             `strategies.aggregation.metric_rules` (unknown keys are dropped).
Client -> server (evaluate): a "metrics" MetricRecord with "num-examples" and the
  evaluation metrics (e.g. "eval_loss", "eval_acc").
A reply holds exactly these records (`check_records`); anything else is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from strategies import codec
from strategies.aggregation.merge import ClientUpdate
from strategies.aggregation.metric_rules import WEIGHT_KEY, check_metrics
from strategies.sparse.masks import Mask

__all__ = [
    "WEIGHT_KEY",
    "Decoded",
    "ReplyError",
    "check_records",
    "decode_dense",
    "decode_payload",
    "decode_reply",
    "encode_global",
    "error_text",
    "records_of",
]

MAX_REASON_CHARS = 120  # a client's own error text is cut to this before it is logged/stored


class ReplyError(ValueError):
    """A client reply is missing a record or field the strategy needs."""


R = TypeVar("R", ArrayRecord, MetricRecord, ConfigRecord)


def records_of(content: RecordDict, kind: type[R]) -> dict[str, R]:
    """The records of one kind in ``content`` as a plain dict, to read (one pass).

    Flower's ``RecordDict.array_records`` (and ``metric_records``, ``config_records``)
    build a synced TypedDict and write every record back into the RecordDict on each
    access (~15 us); a server reads them several times per reply, thousands per round.
    """
    return {k: r for k, r in content.items() if isinstance(r, kind)}


def encode_global(
    values: dict, mask: Mask | None, send_mask: bool = True, value_dtype: str = "fp32"
) -> ArrayRecord:
    """The "arrays" record for a server -> client message (see module docstring)."""
    return codec.to_arrayrecord(
        codec.encode(values, mask, value_dtype=value_dtype, send_mask=send_mask)
    )


def error_text(msg: Message) -> str:
    """One printable line for an error reply: its code and (cut) reason."""
    reason = "".join(c if c.isascii() and c.isprintable() else "?" for c in str(msg.error.reason))
    if len(reason) > MAX_REASON_CHARS:
        reason = reason[:MAX_REASON_CHARS] + "..."
    return f"error reply (code {msg.error.code}): {reason}"


def check_records(msg: Message, arrays: bool) -> None:
    """The reply holds exactly the records of its kind: "metrics" (and "arrays" for train)."""
    # Record names come from the client: reasons count them, never echo them.
    content = msg.content
    want_arrays = ["arrays"] if arrays else []
    array_records = records_of(content, ArrayRecord)
    if sorted(array_records) != want_arrays:
        raise ReplyError(
            f"reply must hold ArrayRecords {want_arrays} only, "
            f"has {len(array_records)} ArrayRecord(s)"
        )
    metric_records = records_of(content, MetricRecord)
    if sorted(metric_records) != ["metrics"]:
        raise ReplyError(
            "reply must hold MetricRecord ['metrics'] only, "
            f"has {len(metric_records)} MetricRecord(s)"
        )
    config_records = records_of(content, ConfigRecord)
    if len(config_records):
        raise ReplyError(f"reply must hold no ConfigRecord, has {len(config_records)}")


def reply_payload(msg: Message, max_bytes: int | None = None) -> bytes:
    """The codec payload in a reply's "arrays" record (raises ReplyError/CodecError)."""
    if msg.has_error():
        raise ReplyError(error_text(msg))
    rec = msg.content.get("arrays")
    if not isinstance(rec, ArrayRecord):
        raise ReplyError("reply has no 'arrays' ArrayRecord")
    return codec.from_arrayrecord(rec, max_bytes)


Decoded = tuple[dict[str, torch.Tensor], Mask]  # (full-shape values, mask; {} when dense)


def decode_payload(
    msg: Message,
    previous_mask: Mask | None = None,
    expected: Mapping[str, codec.TensorSpec] | None = None,
) -> Decoded:
    """Decode a train reply's payload: (values, mask). Metrics: see `metric_rules`.

    `previous_mask` is the mask this node was sent this round; it is used when the client
    replied with ``send_mask=False``. `expected` is the model's wire spec: the payload may
    hold exactly those tensors. Raises CodecError for a bad payload.
    """
    limit = None if expected is None else codec.max_payload_bytes(expected)
    return codec.decode_with(reply_payload(msg, limit), previous_mask, expected)


def decode_reply(
    msg: Message,
    previous_mask: Mask | None = None,
    expected: Mapping[str, codec.TensorSpec] | None = None,
    max_num_examples: int = 2**53,
) -> ClientUpdate:
    """Decode a train reply into a ClientUpdate (payload, and metrics by `metric_rules`).

    Raises CodecError for a bad payload and ReplyError for missing or malformed metrics.
    """
    values, mask = decode_payload(msg, previous_mask, expected)
    rec = msg.content.get("metrics")
    if not isinstance(rec, MetricRecord):
        raise ReplyError("reply has no 'metrics' MetricRecord")
    metrics, problem = check_metrics("train", dict(rec), max_num_examples)
    if problem is not None:
        raise ReplyError(problem)
    return ClientUpdate(
        int(msg.metadata.src_node_id), values, mask, int(metrics[WEIGHT_KEY]), metrics
    )


def decode_dense(msg: Message, expected: Mapping[str, codec.TensorSpec]) -> Decoded:
    """Decode a dense baseline reply (Flower's plain ArrayRecord of the full model).

    Each Array's declared dtype, shape and byte count are checked against the model
    before it is deserialized.
    """
    rec = msg.content.array_records["arrays"]
    if sorted(rec) != sorted(expected):
        missing, extra = sorted(set(expected) - set(rec)), set(rec) - set(expected)
        raise ReplyError(f"key set differs: missing {missing}, {len(extra)} unexpected")
    values: dict[str, torch.Tensor] = {}
    for key, spec in expected.items():
        arr = rec[key]
        want = str(torch.empty(0, dtype=spec.dtype).numpy().dtype)
        if arr.dtype != want or tuple(arr.shape) != spec.shape:
            raise ReplyError(
                f"{key!r}: dtype or shape differs from the model's {want} {spec.shape}"
            )
        if len(arr.data) > spec.numel * spec.dtype.itemsize + 1024:  # + the .npy header
            raise ReplyError(f"{key!r}: {len(arr.data)} bytes for {spec.numel} entries")
        try:
            t = torch.from_numpy(arr.numpy().copy())
        except Exception as exc:  # a forged Array can fail to deserialize in many ways
            raise ReplyError(f"{key!r}: could not be read ({type(exc).__name__})") from exc
        if t.dtype != spec.dtype or tuple(t.shape) != spec.shape:
            raise ReplyError(f"{key!r}: data holds {t.dtype} {tuple(t.shape)}")
        values[key] = t
    return values, {}
