"""Plain records the run store hands back: frozen dataclasses detached from any session."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


def aware(ts: datetime | None) -> datetime | None:
    """`ts` as an aware UTC datetime (None stays None)."""
    # SQLite hands back naive datetimes; everything the store writes is UTC.
    if ts is None or ts.tzinfo is not None:
        return ts
    return ts.replace(tzinfo=UTC)


@dataclass(frozen=True)
class RunInfo:
    """A stored run, detached from any session."""

    id: str
    name: str
    config: dict[str, Any]
    seed: int | None
    code_version: str
    status: str
    created_at: datetime
    finished_at: datetime | None
    last_round: int | None
    num_rounds: int = 0
    final_accuracy: float | None = None
    started_by: str | None = None  # OS user@host that created the run
    signing_key_id: str | None = None  # key that signs its checkpoints; None: unsigned
    flower_run_id: str | None = None  # Flower's run id when a SuperLink ran it

    heartbeat_at: datetime | None = None
    reason: str | None = None  # why it failed, degraded or stopped
    owner: str | None = None  # "host:pid" of the process that last wrote it
    stale: bool = False  # "running", but its process is gone (old heartbeat or dead pid)

    @property
    def display_status(self) -> str:
        """The stored status, or "stale" for a "running" run whose process died."""
        return "stale" if self.stale else self.status


@dataclass(frozen=True)
class CheckpointSignature:
    """What a checkpoint signature covers, as recorded (the blob itself is not loaded)."""

    round: int
    sha256: str
    size: int
    signature: bytes | None
    key_id: str | None


@dataclass(frozen=True)
class RoundInfo:
    """Server-side summary of one stored round."""

    round: int
    metrics: dict[str, Any]
    train_loss: float | None
    accuracy: float | None
    upload_bytes: int
    download_bytes: int
    wall_s: float
    density: float | None
    created_at: datetime
    num_accepted: int | None = None
    degraded: bool = False


@dataclass(frozen=True)
class ClientResultInfo:
    """One client's stored reply summary."""

    round: int
    node_id: str
    metrics: dict[str, Any]
    upload_bytes: int
    download_bytes: int
    accepted: bool
    reason: str | None


@dataclass(frozen=True)
class EventInfo:
    """One stored event (drift, task_switch, error, ...)."""

    round: int | None
    node_id: str | None
    kind: str
    detail: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class StoredMask:
    """A consensus mask as the caller stored it (decompressed, SHA-256 verified)."""

    round: int
    data: bytes
    layer_densities: dict[str, float] = field(default_factory=dict)
