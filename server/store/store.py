"""RunStore: runs, rounds, client results, masks, checkpoints and events in SQLite or PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import uuid
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, delete, func, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from server.store.errors import (
    CheckpointCorruptError,
    RunActiveError,
    RunNotFoundError,
    SecretInConfigError,
    StoreError,
)
from server.store.liveness import is_stale, this_owner
from server.store.models import (
    RUN_STATUSES,
    Checkpoint,
    ClientResult,
    ConsensusMask,
    Event,
    Round,
    Run,
    utcnow,
)
from server.store.redaction import find_secrets, find_secrets_in, mask_secrets, scrub_text
from server.store.schema import (
    DEFAULT_CONNECT_TIMEOUT_S,
    check_schema,
    connect_error,
    make_engine,
    upgrade,
)
from server.store.urls import parse_url, safe_url

FINAL_STATUSES = tuple(s for s in RUN_STATUSES if s != "running")
_CLIENT_KEYS = frozenset(
    {"node_id", "metrics", "upload_bytes", "download_bytes", "accepted", "reason"}
)
_EVENT_KEYS = frozenset({"kind", "node_id", "detail", "round"})
MIN_ID_PREFIX = 4
MAX_REASON_CHARS = 1000
# A blob's recorded size bounds its decompression (no zip bomb from an edited database).
MAX_BLOB_BYTES = 1 << 32


# ----------------------------------------------------------------------------- plain records
def _aware(ts: datetime | None) -> datetime | None:
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


# ----------------------------------------------------------------------------- helpers
def code_version() -> str:
    """`git describe` of the source checkout when there is one, else the installed version."""
    root = Path(__file__).resolve().parents[2]
    if (root / ".git").exists():
        try:
            out = subprocess.run(
                ["git", "-C", str(root), "describe", "--always", "--dirty", "--tags"],
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            )
            if out.stdout.strip():
                return f"git:{out.stdout.strip()}"[:100]
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        return f"leanfed {metadata.version('leanfed')}"
    except metadata.PackageNotFoundError:
        return "leanfed (unknown version)"


def _jsonable(value: Any, where: str) -> Any:
    """A JSON-safe copy: numpy/torch scalars -> Python, NaN/inf -> None (JSON has no NaN)."""
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    item = getattr(value, "item", None)  # numpy / torch scalars
    if callable(item):
        try:
            return _jsonable(item(), where)
        except (TypeError, ValueError):
            pass
    raise StoreError(f"{where} is not JSON-serialisable (got {type(value).__name__})")


def _finite_or_none(value: Any, where: str) -> float | None:
    if value is None:
        return None
    try:
        f = float(value)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{where} must be a number, got {value!r}") from exc
    return f if math.isfinite(f) else None


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise StoreError(f"{where} must be a non-negative int, got {value!r}")
    return value


def _pack(data: bytes, where: str) -> tuple[bytes, str, int]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise StoreError(f"{where} must be bytes, got {type(data).__name__}")
    raw = bytes(data)
    return zlib.compress(raw, 6), hashlib.sha256(raw).hexdigest(), len(raw)


def _safe_json(value: Any, where: str) -> Any:
    # Data a site sends is masked, never refused: see redaction.mask_secrets.
    return _jsonable(mask_secrets(value), where)


def _unpack(blob: bytes, sha256: str, size: int, where: str) -> bytes:
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


# ----------------------------------------------------------------------------- the store
class RunStore:
    """Persistent record of federated runs; every round is written in one transaction.

    `url` is a SQLAlchemy URL: `sqlite:///leanfed.db`, `sqlite://` (in memory, tests) or
    `postgresql+psycopg://user@host:5432/db`. Opening runs the Alembic migrations.
    """

    def __init__(
        self,
        url: str,
        *,
        must_exist: bool = False,
        read_only: bool = False,
        connect_timeout_s: int = DEFAULT_CONNECT_TIMEOUT_S,
    ) -> None:
        parsed = parse_url(url)
        must_exist = must_exist or read_only
        if must_exist and parsed.get_backend_name() == "sqlite":
            path = parsed.database
            if path and path != ":memory:" and not Path(path).exists():
                raise StoreError(f"no leanfed database at {path} (pass --db or set LEANFED_DB_URL)")
        self.read_only = read_only
        self.engine: Engine = make_engine(
            url, connect_timeout_s=connect_timeout_s, read_only=read_only
        )
        try:
            with self.engine.connect():
                pass
        except SQLAlchemyError as exc:
            self.engine.dispose()
            raise connect_error(self.engine, exc) from exc
        try:
            # Read-only commands never create or migrate: they check the revision and refuse.
            self.schema_revision = check_schema(self.engine) if read_only else upgrade(self.engine)
        except BaseException:
            self.engine.dispose()
            raise
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def url(self) -> str:
        """The database URL with any password masked."""
        return safe_url(self.engine.url)

    def close(self) -> None:
        """Release every pooled connection."""
        self.engine.dispose()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _session(self, *, write: bool = False) -> Iterator[Session]:
        # One session == one transaction: commit on success, roll back everything on error.
        with self._sessions() as session:
            try:
                if write:
                    with session.begin():
                        yield session
                else:
                    yield session
            except StoreError:
                raise
            except IntegrityError as exc:
                raise StoreError(f"store rejected the write: {_first_line(exc)}") from exc
            except SQLAlchemyError as exc:
                raise StoreError(f"database error at {self.url}: {_first_line(exc)}") from exc

    def _run(self, session: Session, run_id: str) -> Run:
        run = session.get(Run, run_id)
        if run is None:
            raise RunNotFoundError(f"no run with id {run_id!r} in {self.url}")
        return run

    # ------------------------------------------------------------------ runs
    def create_run(
        self,
        config: Mapping[str, Any],
        seed: int | None = None,
        name: str | None = None,
        *,
        code_version_str: str | None = None,
        started_by: str | None = None,
        signing_key_id: str | None = None,
        flower_run_id: str | None = None,
    ) -> str:
        """Store a new run in status "running" and return its id (32 hex chars).

        Raises SecretInConfigError (naming the keys, never the values) when the config holds
        anything that looks like a password, token or key: secrets never enter the store.
        """
        if not isinstance(config, Mapping):
            raise StoreError(f"config must be a mapping, got {type(config).__name__}")
        secret_paths = find_secrets(config) + find_secrets_in(name, "name")
        if secret_paths:
            raise SecretInConfigError(
                "run config holds secret-looking entries, which never enter the store: "
                + ", ".join(secret_paths)
                + " (pass secrets through the environment or a secret file instead)"
            )
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise StoreError(f"seed must be an int or None, got {seed!r}")
        run_id = uuid.uuid4().hex
        row = Run(
            id=run_id,
            name=(name or f"run-{run_id[:8]}")[:200],
            config=_jsonable(dict(config), "config"),
            seed=seed,
            code_version=(code_version_str or code_version())[:100],
            status="running",
            created_at=utcnow(),
            started_by=None if started_by is None else started_by[:200],
            signing_key_id=_short(signing_key_id, 64, "signing_key_id"),
            flower_run_id=_short(flower_run_id, 32, "flower_run_id"),
            heartbeat_at=utcnow(),
            owner=this_owner(),
        )
        with self._session(write=True) as s:
            s.add(row)
        return run_id

    def finish_run(
        self, run_id: str, status: str = "completed", reason: str | None = None
    ) -> None:
        """Mark a run completed / degraded / failed / interrupted, with why, and stamp finished_at.

        `reason` is free text (an error message): secret-looking spans are masked, and it is
        cut to MAX_REASON_CHARS.
        """
        if status not in FINAL_STATUSES:
            raise StoreError(f"status must be one of {FINAL_STATUSES}, got {status!r}")
        with self._session(write=True) as s:
            run = self._run(s, run_id)
            run.status = status
            run.finished_at = utcnow()
            run.reason = None if reason is None else scrub_text(reason)[:MAX_REASON_CHARS]

    def check_resumable(self, run_id: str) -> int:
        """Raise unless the run may be resumed; return its last committed round. Writes nothing."""
        info = self.get_run(run_id)
        if info.status in ("completed", "degraded"):
            raise StoreError(f"run {run_id} already {info.status}; nothing to resume")
        if info.status == "running" and not info.stale:
            raise RunActiveError(
                f"run {run_id} is running in another process ({info.owner or 'unknown'}, last "
                f"heartbeat {_ago(info.heartbeat_at)}); resume it once it has stopped or is stale"
            )
        return int(info.last_round or 0)

    def reopen_run(self, run_id: str) -> int:
        """Set a stopped run back to "running" to resume it; return its last committed round.

        Checks and writes in one transaction, so a refused resume never changes the status.
        """
        with self._session(write=True) as s:
            run = self._run(s, run_id)
            if run.status in ("completed", "degraded"):
                raise StoreError(f"run {run_id} already {run.status}; nothing to resume")
            heartbeat = _aware(run.heartbeat_at)
            if run.status == "running" and not is_stale(run.status, heartbeat, run.owner):
                raise RunActiveError(
                    f"run {run_id} is running in another process ({run.owner or 'unknown'}); "
                    "resume it once it has stopped or is stale"
                )
            run.status = "running"
            run.finished_at = None
            run.reason = None
            run.heartbeat_at = utcnow()
            run.owner = this_owner()
            return int(run.last_round or 0)

    def heartbeat(self, run_id: str) -> None:
        """Stamp a running run's heartbeat (called every round and every HEARTBEAT_S seconds)."""
        with self._session(write=True) as s:
            run = self._run(s, run_id)
            if run.status == "running":
                run.heartbeat_at = utcnow()

    def delete_run(self, run_id: str) -> None:
        """Delete a run and everything stored with it; a live running run is refused."""
        with self._session(write=True) as s:
            run = self._run(s, run_id)
            if run.status == "running" and not is_stale(
                run.status, _aware(run.heartbeat_at), run.owner
            ):
                raise RunActiveError(
                    f"run {run_id} is running in another process ({run.owner or 'unknown'}); "
                    "stop it first"
                )
            for model in (Event, Checkpoint, ConsensusMask, ClientResult, Round):
                # Explicit deletes: SQLite enforces ON DELETE CASCADE only with foreign keys on.
                s.execute(delete(model).where(model.run_id == run_id))
            s.delete(run)

    def resolve_run_id(self, id_or_prefix: str) -> str:
        """The full id of the run whose id is or starts with `id_or_prefix` (>= 4 chars, unique)."""
        text = id_or_prefix.strip().lower()
        with self._session() as s:
            if s.get(Run, text) is not None:
                return text
            if len(text) < MIN_ID_PREFIX:
                raise RunNotFoundError(f"no run with id {id_or_prefix!r} in {self.url}")
            ids = s.scalars(select(Run.id).where(Run.id.startswith(text, autoescape=True))).all()
        if not ids:
            raise RunNotFoundError(f"no run with id {id_or_prefix!r} in {self.url}")
        if len(ids) > 1:
            raise RunNotFoundError(f"run id prefix {id_or_prefix!r} is ambiguous: {len(ids)} runs")
        return ids[0]

    def _info(self, s: Session, run: Run) -> RunInfo:
        num_rounds = s.scalar(select(func.count()).where(Round.run_id == run.id)) or 0
        acc = s.scalar(
            select(Round.accuracy)
            .where(Round.run_id == run.id, Round.accuracy.is_not(None))
            .order_by(Round.round.desc())
            .limit(1)
        )
        created = _aware(run.created_at)
        assert created is not None
        heartbeat = _aware(run.heartbeat_at)
        return RunInfo(
            id=run.id,
            name=run.name,
            config=dict(run.config),
            seed=run.seed,
            code_version=run.code_version,
            status=run.status,
            created_at=created,
            finished_at=_aware(run.finished_at),
            last_round=run.last_round,
            num_rounds=int(num_rounds),
            final_accuracy=acc,
            started_by=run.started_by,
            signing_key_id=run.signing_key_id,
            flower_run_id=run.flower_run_id,
            heartbeat_at=heartbeat,
            reason=run.reason,
            owner=run.owner,
            stale=is_stale(run.status, heartbeat, run.owner),
        )

    def get_run(self, run_id: str) -> RunInfo:
        """The run with this exact id; RunNotFoundError otherwise."""
        with self._session() as s:
            return self._info(s, self._run(s, run_id))

    def list_runs(self, *, limit: int | None = None) -> list[RunInfo]:
        """All runs, newest first."""
        with self._session() as s:
            q = select(Run).order_by(Run.created_at.desc(), Run.id)
            if limit is not None:
                q = q.limit(limit)
            return [self._info(s, r) for r in s.scalars(q).all()]

    # ------------------------------------------------------------------ rounds
    def record_round(
        self,
        run_id: str,
        round: int,
        *,
        metrics: Mapping[str, Any],
        upload_bytes: int,
        download_bytes: int,
        wall_s: float,
        density: float | None = None,
        client_results: Sequence[Mapping[str, Any]] = (),
        mask_blob: bytes | None = None,
        layer_densities: Mapping[str, float] | None = None,
        checkpoint: bytes | None = None,
        events: Sequence[Mapping[str, Any]] = (),
        train_loss: float | None = None,
        accuracy: float | None = None,
        checkpoint_signature: tuple[bytes, str] | None = None,
        num_accepted: int | None = None,
        degraded: bool = False,
    ) -> None:
        """Write everything about one round in ONE transaction: all of it or none of it.

        `train_loss` / `accuracy` default to metrics["train_loss"] / metrics["accuracy"].
        `checkpoint_signature` is (Ed25519 signature, key id), stored beside the checkpoint.
        client_results items: node_id, accepted, and optional metrics, upload_bytes,
        download_bytes, reason. events items: kind, and optional node_id, detail, round.
        """
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise StoreError(f"round must be a non-negative int, got {round!r}")
        metrics_json = _safe_json(dict(metrics), "metrics")
        loss = _finite_or_none(
            train_loss if train_loss is not None else metrics.get("train_loss"), "train_loss"
        )
        acc = _finite_or_none(
            accuracy if accuracy is not None else metrics.get("accuracy"), "accuracy"
        )
        wall = _finite_or_none(wall_s, "wall_s")
        rows: list[Any] = [
            Round(
                run_id=run_id,
                round=round,
                metrics=metrics_json,
                train_loss=loss,
                accuracy=acc,
                upload_bytes=_count(upload_bytes, "upload_bytes"),
                download_bytes=_count(download_bytes, "download_bytes"),
                wall_s=wall if wall is not None else 0.0,
                density=_finite_or_none(density, "density"),
                num_accepted=None if num_accepted is None else _count(num_accepted, "num_accepted"),
                degraded=bool(degraded),
                created_at=utcnow(),
            )
        ]
        rows += [_client_row(run_id, round, i, c) for i, c in enumerate(client_results)]
        if mask_blob is not None:
            rows.append(_mask_row(run_id, round, mask_blob, layer_densities))
        elif layer_densities is not None:
            raise StoreError("layer_densities given without mask_blob")
        if checkpoint is not None:
            rows.append(_checkpoint_row(run_id, round, checkpoint, checkpoint_signature))
        elif checkpoint_signature is not None:
            raise StoreError("checkpoint_signature given without checkpoint")
        rows += [_event_row(run_id, round, i, e) for i, e in enumerate(events)]
        with self._session(write=True) as s:
            run = self._run(s, run_id)
            if run.status != "running":
                raise StoreError(f"run {run_id} is {run.status}; cannot record round {round}")
            exists = s.scalar(select(Round.id).where(Round.run_id == run_id, Round.round == round))
            if exists is not None:
                raise StoreError(f"run {run_id} already has round {round}")
            for row in rows:
                s.add(row)
                # Flush row by row so a failing insert surfaces here, inside the transaction.
                s.flush()
            run.last_round = round if run.last_round is None else max(run.last_round, round)
            run.heartbeat_at = utcnow()

    def record_event(
        self,
        run_id: str,
        kind: str,
        *,
        round: int | None = None,
        node_id: str | int | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        """Store one event outside a round's transaction (e.g. a run-level error)."""
        row = _event_row(run_id, round, 0, {"kind": kind, "node_id": node_id, "detail": detail})
        row.round = round
        with self._session(write=True) as s:
            self._run(s, run_id)
            s.add(row)

    def get_rounds(self, run_id: str) -> list[RoundInfo]:
        """Every stored round of the run, in round order."""
        with self._session() as s:
            self._run(s, run_id)
            q = select(Round).where(Round.run_id == run_id).order_by(Round.round)
            return [
                RoundInfo(
                    round=r.round,
                    metrics=dict(r.metrics),
                    train_loss=r.train_loss,
                    accuracy=r.accuracy,
                    upload_bytes=r.upload_bytes,
                    download_bytes=r.download_bytes,
                    wall_s=r.wall_s,
                    density=r.density,
                    created_at=_aware(r.created_at) or r.created_at,
                    num_accepted=r.num_accepted,
                    degraded=bool(r.degraded),
                )
                for r in s.scalars(q).all()
            ]

    def get_client_results(self, run_id: str, round: int | None = None) -> list[ClientResultInfo]:
        """Client replies of the run (of one round when given), by round then insertion."""
        with self._session() as s:
            self._run(s, run_id)
            q = select(ClientResult).where(ClientResult.run_id == run_id)
            if round is not None:
                q = q.where(ClientResult.round == round)
            q = q.order_by(ClientResult.round, ClientResult.id)
            return [
                ClientResultInfo(
                    round=c.round,
                    node_id=c.node_id,
                    metrics=dict(c.metrics),
                    upload_bytes=c.upload_bytes,
                    download_bytes=c.download_bytes,
                    accepted=c.accepted,
                    reason=c.reason,
                )
                for c in s.scalars(q).all()
            ]

    def get_events(
        self, run_id: str, *, kind: str | None = None, round: int | None = None
    ) -> list[EventInfo]:
        """Events of the run, optionally filtered by kind and round, in insertion order."""
        with self._session() as s:
            self._run(s, run_id)
            q = select(Event).where(Event.run_id == run_id)
            if kind is not None:
                q = q.where(Event.kind == kind)
            if round is not None:
                q = q.where(Event.round == round)
            return [
                EventInfo(
                    round=e.round,
                    node_id=e.node_id,
                    kind=e.kind,
                    detail=dict(e.detail),
                    created_at=_aware(e.created_at) or e.created_at,
                )
                for e in s.scalars(q.order_by(Event.id)).all()
            ]

    # ------------------------------------------------------------------ blobs
    def get_mask(self, run_id: str, round: int | None = None) -> StoredMask | None:
        """The consensus mask bytes of `round` (latest when None); None if none was stored."""
        with self._session() as s:
            self._run(s, run_id)
            q = select(ConsensusMask).where(ConsensusMask.run_id == run_id)
            q = q.where(ConsensusMask.round == round) if round is not None else q
            m = s.scalars(q.order_by(ConsensusMask.round.desc()).limit(1)).first()
            if m is None:
                return None
            data = _unpack(m.blob, m.sha256, m.size, f"mask of run {run_id} round {m.round}")
            return StoredMask(
                round=m.round,
                data=data,
                layer_densities={k: float(v) for k, v in m.layer_densities.items()},
            )

    def get_layer_densities(self, run_id: str) -> list[tuple[int, dict[str, float]]]:
        """(round, {layer: density}) for every stored consensus mask, in round order."""
        with self._session() as s:
            self._run(s, run_id)
            q = (
                select(ConsensusMask.round, ConsensusMask.layer_densities)
                .where(ConsensusMask.run_id == run_id)
                .order_by(ConsensusMask.round)
            )
            return [(r, {k: float(v) for k, v in d.items()}) for r, d in s.execute(q).all()]

    def latest_checkpoint(self, run_id: str) -> tuple[int, bytes] | None:
        """(round, bytes) of the newest checkpoint, SHA-256 verified; None when there is none.

        Raises CheckpointCorruptError when the stored bytes do not match their recorded hash.
        """
        return self._checkpoint(run_id, None)

    def get_checkpoint(self, run_id: str, round: int) -> bytes:
        """The checkpoint bytes of one round, SHA-256 verified; StoreError if none stored."""
        found = self._checkpoint(run_id, round)
        if found is None:
            raise StoreError(f"run {run_id} has no checkpoint for round {round}")
        return found[1]

    def checkpoint_sha256(self, run_id: str) -> tuple[int, str] | None:
        """(round, recorded SHA-256) of the newest checkpoint, without loading the blob."""
        with self._session() as s:
            self._run(s, run_id)
            row = s.execute(
                select(Checkpoint.round, Checkpoint.sha256)
                .where(Checkpoint.run_id == run_id)
                .order_by(Checkpoint.round.desc())
                .limit(1)
            ).first()
            return None if row is None else (row[0], row[1])

    def checkpoint_signatures(self, run_id: str) -> list[CheckpointSignature]:
        """Recorded SHA-256, size, signature and key id of every checkpoint, in round order."""
        with self._session() as s:
            self._run(s, run_id)
            q = (
                select(
                    Checkpoint.round,
                    Checkpoint.sha256,
                    Checkpoint.size,
                    Checkpoint.signature,
                    Checkpoint.key_id,
                )
                .where(Checkpoint.run_id == run_id)
                .order_by(Checkpoint.round)
            )
            return [
                CheckpointSignature(r, sha, size, None if sig is None else bytes(sig), kid)
                for r, sha, size, sig, kid in s.execute(q).all()
            ]

    def has_signed_checkpoints(self) -> bool:
        """Whether any run in this store has a signed checkpoint."""
        with self._session() as s:
            q = select(Checkpoint.id).where(Checkpoint.signature.is_not(None)).limit(1)
            return s.scalar(q) is not None

    def _checkpoint(self, run_id: str, round: int | None) -> tuple[int, bytes] | None:
        with self._session() as s:
            self._run(s, run_id)
            q = select(Checkpoint).where(Checkpoint.run_id == run_id)
            q = q.where(Checkpoint.round == round) if round is not None else q
            c = s.scalars(q.order_by(Checkpoint.round.desc()).limit(1)).first()
            if c is None:
                return None
            where = f"checkpoint of run {run_id} round {c.round}"
            return c.round, _unpack(c.blob, c.sha256, c.size, where)


# ----------------------------------------------------------------------------- row builders
def _ago(ts: datetime | None) -> str:
    if ts is None:
        return "never"
    return f"{max(0, int((utcnow() - ts).total_seconds()))} s ago"


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _node_id(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, int | str) or str(value) == "":
        raise StoreError(f"{where} must be an int or non-empty str, got {value!r}")
    text = str(value)
    if len(text) > 32:
        raise StoreError(f"{where} is longer than 32 characters: {text!r}")
    return text


def _client_row(run_id: str, round: int, i: int, c: Mapping[str, Any]) -> ClientResult:
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
        node_id=_node_id(c["node_id"], f"{where}.node_id"),
        metrics=_safe_json(dict(c.get("metrics") or {}), f"{where}.metrics"),
        upload_bytes=_count(c.get("upload_bytes", 0), f"{where}.upload_bytes"),
        download_bytes=_count(c.get("download_bytes", 0), f"{where}.download_bytes"),
        accepted=bool(c["accepted"]),
        reason=None if reason is None else scrub_text(str(reason))[:MAX_REASON_CHARS],
    )


def _mask_row(
    run_id: str, round: int, data: bytes, layer_densities: Mapping[str, float] | None
) -> ConsensusMask:
    blob, sha, size = _pack(data, "mask_blob")
    dens = {
        str(k): _finite_or_none(v, f"layer_densities[{k!r}]")
        for k, v in (layer_densities or {}).items()
    }
    return ConsensusMask(
        run_id=run_id, round=round, blob=blob, sha256=sha, size=size, layer_densities=dens
    )


def _short(value: str | None, limit: int, where: str) -> str | None:
    if value is not None and (not isinstance(value, str) or not value or len(value) > limit):
        raise StoreError(f"{where} must be a non-empty str of <= {limit} chars")
    return value


def _checkpoint_row(
    run_id: str, round: int, data: bytes, signature: tuple[bytes, str] | None
) -> Checkpoint:
    blob, sha, size = _pack(data, "checkpoint")
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
        key_id=_short(kid, 64, "checkpoint key_id"),
    )


def _event_row(run_id: str, round: int | None, i: int, e: Mapping[str, Any]) -> Event:
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
        node_id=None if node is None else _node_id(node, f"{where}.node_id"),
        kind=kind,
        detail=_safe_json(dict(detail), f"{where}.detail"),
        created_at=utcnow(),
    )


def dumps_config(config: Mapping[str, Any]) -> str:
    """Canonical JSON of a stored config (sorted keys), for display and hashing."""
    return json.dumps(config, sort_keys=True, default=str)
