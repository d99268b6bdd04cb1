"""RunStore: runs, rounds, client results, masks, checkpoints and events in SQLite or PostgreSQL.

The writes (run lifecycle, one transaction per round) live here; the reads in queries.py,
the connection in base.py, input checks and row builders in rows.py, returned records in
records.py. Every name callers import from this module is re-exported.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select

from server.store.errors import RunActiveError, SecretInConfigError, StoreError
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
from server.store.queries import MIN_ID_PREFIX, RunQueries
from server.store.records import (
    CheckpointSignature,
    ClientResultInfo,
    EventInfo,
    RoundInfo,
    RunInfo,
    StoredMask,
    aware,
)
from server.store.redaction import find_secrets, find_secrets_in, scrub_text
from server.store.rows import (
    MAX_BLOB_BYTES,
    MAX_REASON_CHARS,
    checkpoint_row,
    client_row,
    event_row,
    finite_or_none,
    jsonable,
    mask_row,
    non_negative,
    safe_json,
    short_str,
)

__all__ = [
    "FINAL_STATUSES",
    "MAX_BLOB_BYTES",
    "MAX_REASON_CHARS",
    "MIN_ID_PREFIX",
    "CheckpointSignature",
    "ClientResultInfo",
    "EventInfo",
    "RoundInfo",
    "RunInfo",
    "RunStore",
    "StoredMask",
    "code_version",
    "dumps_config",
]

FINAL_STATUSES = tuple(s for s in RUN_STATUSES if s != "running")


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


class RunStore(RunQueries):
    """Persistent record of federated runs; every round is written in one transaction.

    `url` is a SQLAlchemy URL: `sqlite:///leanfed.db`, `sqlite://` (in memory, tests) or
    `postgresql+psycopg://user@host:5432/db`. Opening runs the Alembic migrations.
    """

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
            config=jsonable(dict(config), "config"),
            seed=seed,
            code_version=(code_version_str or code_version())[:100],
            status="running",
            created_at=utcnow(),
            started_by=None if started_by is None else started_by[:200],
            signing_key_id=short_str(signing_key_id, 64, "signing_key_id"),
            flower_run_id=short_str(flower_run_id, 32, "flower_run_id"),
            heartbeat_at=utcnow(),
            owner=this_owner(),
        )
        with self._session(write=True) as s:
            s.add(row)
        return run_id

    def finish_run(self, run_id: str, status: str = "completed", reason: str | None = None) -> None:
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
            heartbeat = aware(run.heartbeat_at)
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
                run.status, aware(run.heartbeat_at), run.owner
            ):
                raise RunActiveError(
                    f"run {run_id} is running in another process ({run.owner or 'unknown'}); "
                    "stop it first"
                )
            for model in (Event, Checkpoint, ConsensusMask, ClientResult, Round):
                # Explicit deletes: SQLite enforces ON DELETE CASCADE only with foreign keys on.
                s.execute(delete(model).where(model.run_id == run_id))
            s.delete(run)

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
        metrics_json = safe_json(dict(metrics), "metrics")
        loss = finite_or_none(
            train_loss if train_loss is not None else metrics.get("train_loss"), "train_loss"
        )
        acc = finite_or_none(
            accuracy if accuracy is not None else metrics.get("accuracy"), "accuracy"
        )
        wall = finite_or_none(wall_s, "wall_s")
        rows: list[Any] = [
            Round(
                run_id=run_id,
                round=round,
                metrics=metrics_json,
                train_loss=loss,
                accuracy=acc,
                upload_bytes=non_negative(upload_bytes, "upload_bytes"),
                download_bytes=non_negative(download_bytes, "download_bytes"),
                wall_s=wall if wall is not None else 0.0,
                density=finite_or_none(density, "density"),
                num_accepted=None
                if num_accepted is None
                else non_negative(num_accepted, "num_accepted"),
                degraded=bool(degraded),
                created_at=utcnow(),
            )
        ]
        rows += [client_row(run_id, round, i, c) for i, c in enumerate(client_results)]
        if mask_blob is not None:
            rows.append(mask_row(run_id, round, mask_blob, layer_densities))
        elif layer_densities is not None:
            raise StoreError("layer_densities given without mask_blob")
        if checkpoint is not None:
            rows.append(checkpoint_row(run_id, round, checkpoint, checkpoint_signature))
        elif checkpoint_signature is not None:
            raise StoreError("checkpoint_signature given without checkpoint")
        rows += [event_row(run_id, round, i, e) for i, e in enumerate(events)]
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
        row = event_row(run_id, round, 0, {"kind": kind, "node_id": node_id, "detail": detail})
        row.round = round
        with self._session(write=True) as s:
            self._run(s, run_id)
            s.add(row)


def _ago(ts: datetime | None) -> str:
    if ts is None:
        return "never"
    return f"{max(0, int((utcnow() - ts).total_seconds()))} s ago"


def dumps_config(config: Mapping[str, Any]) -> str:
    """Canonical JSON of a stored config (sorted keys), for display and hashing."""
    return json.dumps(config, sort_keys=True, default=str)
