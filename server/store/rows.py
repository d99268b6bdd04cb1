"""Validation and row builders: caller input checked and turned into ORM rows, blobs packed."""

from __future__ import annotations

import hashlib
import math
import zlib
from collections.abc import Mapping
from typing import Any

from server.store.errors import CheckpointCorruptError, StoreError
from server.store.models import Checkpoint, ClientResult, ConsensusMask, Event, utcnow
from server.store.redaction import mask_secrets, scrub_text

_CLIENT_KEYS = frozenset(
    {"node_id", "metrics", "upload_bytes", "download_bytes", "accepted", "reason"}
)
_EVENT_KEYS = frozenset({"kind", "node_id", "detail", "round"})
MAX_REASON_CHARS = 1000
# A blob's recorded size bounds its decompression (no zip bomb from an edited database).
MAX_BLOB_BYTES = 1 << 32


def jsonable(value: Any, where: str) -> Any:
    """A JSON-safe copy: numpy/torch scalars -> Python, NaN/inf -> None (JSON has no NaN)."""
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    item = getattr(value, "item", None)  # numpy / torch scalars
    if callable(item):
        try:
            return jsonable(item(), where)
        except (TypeError, ValueError):
            pass
    raise StoreError(f"{where} is not JSON-serialisable (got {type(value).__name__})")


def finite_or_none(value: Any, where: str) -> float | None:
    if value is None:
        return None
    try:
        f = float(value)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{where} must be a number, got {value!r}") from exc
    return f if math.isfinite(f) else None


def non_negative(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise StoreError(f"{where} must be a non-negative int, got {value!r}")
    return value


def pack_blob(data: bytes, where: str) -> tuple[bytes, str, int]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise StoreError(f"{where} must be bytes, got {type(data).__name__}")
    raw = bytes(data)
    return zlib.compress(raw, 6), hashlib.sha256(raw).hexdigest(), len(raw)


def safe_json(value: Any, where: str) -> Any:
    # Data a site sends is masked, never refused: see redaction.mask_secrets.
    return jsonable(mask_secrets(value), where)


def unpack_blob(blob: bytes, sha256: str, size: int, where: str) -> bytes:
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_BLOB_BYTES:
        raise CheckpointCorruptError(f"{where} is corrupt: recorded size {size!r} out of range")
    try:
        inflate = zlib.decompressobj()
        raw = inflate.decompress(bytes(blob), size + 1)  # never more than the recorded size
    except zlib.error as exc:
        raise CheckpointCorruptError(f"{where} is corrupt: does not decompress ({exc})") from exc
    digest = hashlib.sha256(raw).hexdigest()
    if digest != sha256 or len(raw) != size:
        raise CheckpointCorruptError(
            f"{where} is corrupt: SHA-256 {digest} ({len(raw)} bytes) does not match the "
            f"recorded {sha256} ({size} bytes)"
        )
    return raw


def node_id_str(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, int | str) or str(value) == "":
        raise StoreError(f"{where} must be an int or non-empty str, got {value!r}")
    text = str(value)
    if len(text) > 32:
        raise StoreError(f"{where} is longer than 32 characters: {text!r}")
    return text


def client_row(run_id: str, round: int, i: int, c: Mapping[str, Any]) -> ClientResult:
    where = f"client_results[{i}]"
    unknown = set(c) - _CLIENT_KEYS
    if unknown:
        raise StoreError(
            f"{where} has unknown keys {sorted(unknown)}; allowed {sorted(_CLIENT_KEYS)}"
        )
    if "node_id" not in c or "accepted" not in c:
        raise StoreError(f"{where} needs 'node_id' and 'accepted'")
    reason = c.get("reason")
    return ClientResult(
        run_id=run_id,
        round=round,
        node_id=node_id_str(c["node_id"], f"{where}.node_id"),
        metrics=safe_json(dict(c.get("metrics") or {}), f"{where}.metrics"),
        upload_bytes=non_negative(c.get("upload_bytes", 0), f"{where}.upload_bytes"),
        download_bytes=non_negative(c.get("download_bytes", 0), f"{where}.download_bytes"),
        accepted=bool(c["accepted"]),
        reason=None if reason is None else scrub_text(str(reason))[:MAX_REASON_CHARS],
    )


def mask_row(
    run_id: str, round: int, data: bytes, layer_densities: Mapping[str, float] | None
) -> ConsensusMask:
    blob, sha, size = pack_blob(data, "mask_blob")
    dens = {
        str(k): finite_or_none(v, f"layer_densities[{k!r}]")
        for k, v in (layer_densities or {}).items()
    }
    return ConsensusMask(
        run_id=run_id, round=round, blob=blob, sha256=sha, size=size, layer_densities=dens
    )


def short_str(value: str | None, limit: int, where: str) -> str | None:
    if value is not None and (not isinstance(value, str) or not value or len(value) > limit):
        raise StoreError(f"{where} must be a non-empty str of <= {limit} chars")
    return value


def checkpoint_row(
    run_id: str, round: int, data: bytes, signature: tuple[bytes, str] | None
) -> Checkpoint:
    blob, sha, size = pack_blob(data, "checkpoint")
    sig, kid = (None, None) if signature is None else signature
    if sig is not None and not isinstance(sig, bytes):
        raise StoreError(f"checkpoint signature must be bytes, got {type(sig).__name__}")
    return Checkpoint(
        run_id=run_id,
        round=round,
        blob=blob,
        sha256=sha,
        size=size,
        created_at=utcnow(),
        signature=sig,
        key_id=short_str(kid, 64, "checkpoint key_id"),
    )


def event_row(run_id: str, round: int | None, i: int, e: Mapping[str, Any]) -> Event:
    where = f"events[{i}]"
    unknown = set(e) - _EVENT_KEYS
    if unknown:
        raise StoreError(
            f"{where} has unknown keys {sorted(unknown)}; allowed {sorted(_EVENT_KEYS)}"
        )
    kind = e.get("kind")
    if not isinstance(kind, str) or not kind or len(kind) > 50:
        raise StoreError(f"{where}.kind must be a non-empty str of <= 50 chars, got {kind!r}")
    node = e.get("node_id")
    ev_round = e.get("round", round)
    if ev_round is not None and (isinstance(ev_round, bool) or not isinstance(ev_round, int)):
        raise StoreError(f"{where}.round must be an int or None, got {ev_round!r}")
    detail = e.get("detail") or {}
    if not isinstance(detail, Mapping):
        raise StoreError(f"{where}.detail must be a mapping, got {type(detail).__name__}")
    return Event(
        run_id=run_id,
        round=ev_round,
        node_id=None if node is None else node_id_str(node, f"{where}.node_id"),
        kind=kind,
        detail=safe_json(dict(detail), f"{where}.detail"),
        created_at=utcnow(),
    )
