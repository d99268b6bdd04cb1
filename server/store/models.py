"""SQLAlchemy 2 typed ORM models of the run store (the Alembic migrations create these tables)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

RUN_STATUSES = ("running", "completed", "degraded", "failed", "interrupted")

# Stable constraint names so Alembic migrations (and SQLite batch mode) can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Timezone-aware now in UTC (the store writes UTC everywhere)."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    """Declarative base carrying the shared metadata and the naming convention."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, datetime: DateTime(timezone=True)}


def _run_fk() -> Mapped[str]:
    return mapped_column(String(32), ForeignKey("runs.id", ondelete="CASCADE"), nullable=False)


class Run(Base):
    """One federated run: its config (secrets stripped), seed, code version and lifecycle."""

    __tablename__ = "runs"
    __table_args__ = (
        CheckConstraint(
            "status IN ('running', 'completed', 'degraded', 'failed', 'interrupted')",
            name="status",
        ),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # uuid4 hex
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    config: Mapped[dict[str, Any]] = mapped_column(nullable=False)
    seed: Mapped[int | None] = mapped_column(BigInteger)
    code_version: Mapped[str] = mapped_column(String(100), nullable=False)
    status: Mapped[str] = mapped_column(String(20), nullable=False, default="running")
    created_at: Mapped[datetime] = mapped_column(nullable=False, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()
    last_round: Mapped[int | None] = mapped_column(Integer)
    # Audit (revision 0002): OS user@host that started it, the id of the key that signs its
    # checkpoints (None: unsigned), and Flower's run id when it ran under a SuperLink.
    started_by: Mapped[str | None] = mapped_column(String(200))
    signing_key_id: Mapped[str | None] = mapped_column(String(64))
    flower_run_id: Mapped[str | None] = mapped_column(String(32))
    # Written every round and periodically: "running" with an old heartbeat means the process died.
    heartbeat_at: Mapped[datetime | None] = mapped_column()
    reason: Mapped[str | None] = mapped_column(Text)  # why it failed / degraded / stopped
    owner: Mapped[str | None] = mapped_column(String(100))  # "host:pid" of the writing process


class Round(Base):
    """Server-side summary of one round: metrics and bytes counted from encoded payloads."""

    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("run_id", "round"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = _run_fk()
    round: Mapped[int] = mapped_column(Integer, nullable=False)
    metrics: Mapped[dict[str, Any]] = mapped_column(nullable=False)
    train_loss: Mapped[float | None] = mapped_column(Float)
    accuracy: Mapped[float | None] = mapped_column(Float)
    upload_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)  # clients -> server
    download_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)  # server -> clients
    wall_s: Mapped[float] = mapped_column(Float, nullable=False)
    density: Mapped[float | None] = mapped_column(Float)
    num_accepted: Mapped[int | None] = mapped_column(Integer)  # replies aggregation accepted
    # Fewer accepted replies than the run's min-accepted-replies.
    degraded: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(nullable=False, default=utcnow)


class ClientResult(Base):
    """One client's reply in a round, and whether aggregation accepted it (and why not)."""

    __tablename__ = "client_results"
    __table_args__ = (Index("ix_client_results_run_id_round", "run_id", "round"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = _run_fk()
    round: Mapped[int] = mapped_column(Integer, nullable=False)
    # Flower node ids are unsigned 64-bit, beyond BIGINT's range: store them as text.
    node_id: Mapped[str] = mapped_column(String(32), nullable=False)
    metrics: Mapped[dict[str, Any]] = mapped_column(nullable=False)
    upload_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    download_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    accepted: Mapped[bool] = mapped_column(Boolean, nullable=False)
    reason: Mapped[str | None] = mapped_column(Text)


class ConsensusMask(Base):
    """The server's consensus mask after a round: zlib of the caller's bytes + layer densities."""

    __tablename__ = "consensus_masks"
    __table_args__ = (UniqueConstraint("run_id", "round"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = _run_fk()
    round: Mapped[int] = mapped_column(Integer, nullable=False)
    blob: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)  # zlib-compressed
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)  # of the uncompressed bytes
    size: Mapped[int] = mapped_column(BigInteger, nullable=False)  # uncompressed length
    layer_densities: Mapped[dict[str, Any]] = mapped_column(nullable=False)


class Checkpoint(Base):
    """The global model after a round: zlib of the caller's bytes, verified by SHA-256 on read."""

    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("run_id", "round"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = _run_fk()
    round: Mapped[int] = mapped_column(Integer, nullable=False)
    blob: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)  # zlib-compressed
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)  # of the uncompressed bytes
    size: Mapped[int] = mapped_column(BigInteger, nullable=False)  # uncompressed length
    created_at: Mapped[datetime] = mapped_column(nullable=False, default=utcnow)
    # Ed25519 signature by the server key (server.security.checkpoints); None: unsigned.
    signature: Mapped[bytes | None] = mapped_column(LargeBinary)
    key_id: Mapped[str | None] = mapped_column(String(64))


class Event(Base):
    """Something notable in a run: drift detected, task switch, client error, ..."""

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_run_id_round", "run_id", "round"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = _run_fk()
    round: Mapped[int | None] = mapped_column(Integer)  # None for run-level events
    node_id: Mapped[str | None] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(50), nullable=False)
    detail: Mapped[dict[str, Any]] = mapped_column(nullable=False)
    created_at: Mapped[datetime] = mapped_column(nullable=False, default=utcnow)
