"""Message layout of the SecAgg+ stages, shared by the server strategy and the ClientApp.

Every stage message carries one ConfigRecord under ``RECORD`` ("secagg"); the stages
other than the masked input are queries ``query.secagg_<stage>``:

  advertise  S->C  {"round"}                      C->S  {"c-pk": 32 B, "s-pk": 32 B}
  share      S->C  {"round", "threshold", "ids": group ids (8 B each, self included),
                    "c-pks": [32 B], "s-pks": [32 B]}
             C->S  {"dst": neighbour ids, "ct": [ciphertext per neighbour]}
  train      S->C  the normal train message plus {"round", "u1": group ids that shared
                    keys, "src": sender ids, "ct": [ciphertexts for this node], "full",
                    "clip", "quant-bits", "max-weight", "num-clients"; with client-level DP
                    also "dp-clip", "dp-min-survivors", "dp-sampled", "dp-count-noise"}
             C->S  {"masked": packed masked vector}  -- and nothing else: no metrics (with
                    record-level DP, beside it MetricRecord "metrics" = {"dp_epsilon",
                    "dp_rounds", "num-examples"} only: metric_rules.DP_RECORD_RULES)
  unmask     S->C  {"round", "survivors": ids, "dropped": ids}
             C->S  {"src": ids, "kind": one byte per share (0 = b, 1 = s_sk), "shares": [68 B]}

Node ids travel as unsigned 64-bit little-endian words (`protocol.ids_to_bytes`):
SuperNode ids do not fit Flower's signed int64 config values.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, RecordDict
from flwr.common.serde import config_record_to_proto

RECORD = "secagg"
ADVERTISE, SHARE, UNMASK = "secagg_advertise", "secagg_share", "secagg_unmask"
MODE_KEY = "leanfed.secure"  # in the train "config" record: "secagg" when the reply is masked


def record_bytes(rec: ConfigRecord) -> int:
    """Serialized size of a stage record (protobuf): the bytes this stage puts on the wire."""
    return int(config_record_to_proto(rec).ByteSize())


def stage_record(content: RecordDict) -> ConfigRecord | None:
    """The "secagg" ConfigRecord of a message, or None."""
    return content.config_records.get(RECORD)


def get_bytes(rec: ConfigRecord, key: str) -> bytes:
    """A bytes entry; raises ValueError naming the key when absent or of another type."""
    value = rec.get(key)
    if not isinstance(value, bytes):
        raise ValueError(f"secagg record entry {key!r} must be bytes")
    return value


def get_bytes_list(rec: ConfigRecord, key: str, count: int, size: int | None = None) -> list[bytes]:
    """A list of exactly `count` bytes entries (each `size` long when given)."""
    value = rec.get(key)
    if value is None and count == 0:
        return []
    if not isinstance(value, list) or len(value) != count:
        raise ValueError(f"secagg record entry {key!r} must list {count} byte strings")
    out = [v for v in value if isinstance(v, bytes) and (size is None or len(v) == size)]
    if len(out) != count:
        raise ValueError(f"secagg record entry {key!r} holds malformed byte strings")
    return out


def get_int(rec: ConfigRecord, key: str) -> int:
    value = rec.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"secagg record entry {key!r} must be an integer")
    return value
