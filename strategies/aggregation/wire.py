"""Message <-> ClientUpdate helpers shared by the strategy and (mirrored by) the ClientApp.

Server -> client (train and evaluate), a RecordDict with:
  "arrays": ArrayRecord from `codec.to_arrayrecord` (one uint8 Array under
            ``codec.PAYLOAD_KEY``): the global values under the consensus mask. The mask is
            inside only when this node does not hold it yet (``send_mask``); otherwise the
            client decodes with ``codec.decode_with(payload, mask_it_holds)``.
  "config": ConfigRecord: "server-round", plus the "leanfed.*" keys set by SparseFedAvg.
Client -> server (train), a RecordDict with:
  "arrays":  ArrayRecord from `codec.to_arrayrecord` of ``codec.encode(state, client_mask,
             value_dtype=<upload dtype>, send_mask=<client changed its mask>)``; with
             ``send_mask=False`` the client's mask is the one it received this round.
  "metrics": MetricRecord with "num-examples" (int > 0), "train_loss", "density",
             "upload_bytes", "drift" (0/1), "regrew" (0/1); extra numeric keys are kept.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Message

from strategies import codec
from strategies.aggregation.merge import ClientUpdate
from strategies.sparse.masks import Mask

WEIGHT_KEY = "num-examples"


class ReplyError(ValueError):
    """A client reply is missing a record or field the strategy needs."""


def encode_global(
    values: dict, mask: Mask | None, send_mask: bool = True, value_dtype: str = "fp32"
) -> ArrayRecord:
    """The "arrays" record for a server -> client message (see module docstring)."""
    return codec.to_arrayrecord(
        codec.encode(values, mask, value_dtype=value_dtype, send_mask=send_mask)
    )


def reply_payload(msg: Message) -> bytes:
    """The codec payload in a reply's "arrays" record (raises ReplyError/CodecError)."""
    if msg.has_error():
        raise ReplyError(f"error reply (code {msg.error.code}): {msg.error.reason}")
    content = msg.content
    if "arrays" not in content.array_records:
        raise ReplyError(f"reply has no 'arrays' ArrayRecord (has {sorted(content.array_records)})")
    return codec.from_arrayrecord(content.array_records["arrays"])


def decode_reply(msg: Message, previous_mask: Mask | None = None) -> ClientUpdate:
    """Decode a train reply into a ClientUpdate.

    `previous_mask` is the mask this node was sent this round; it is used when the client
    replied with ``send_mask=False``. Raises CodecError for a bad payload and ReplyError
    for missing or malformed metrics.
    """
    payload = reply_payload(msg)
    values, mask = codec.decode_with(payload, previous_mask)
    if "metrics" not in msg.content.metric_records:
        raise ReplyError(
            f"reply has no 'metrics' MetricRecord (has {sorted(msg.content.metric_records)})"
        )
    metrics = dict(msg.content.metric_records["metrics"])
    n = metrics.get(WEIGHT_KEY)
    if isinstance(n, bool) or not isinstance(n, int | float) or int(n) != n or n <= 0:
        raise ReplyError(f"metric {WEIGHT_KEY!r} must be a positive integer, got {n!r}")
    scalars = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    return ClientUpdate(
        node_id=int(msg.metadata.src_node_id),
        values=values,
        mask=mask,
        num_examples=int(n),
        metrics=scalars,
    )
