"""RunQueries: the run store's reads (runs, rounds, client replies, events, masks, checkpoints)."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.store.base import StoreBase
from server.store.errors import RunNotFoundError, StoreError
from server.store.liveness import is_stale
from server.store.models import Checkpoint, ClientResult, ConsensusMask, Event, Round, Run
from server.store.records import (
    CheckpointSignature,
    ClientResultInfo,
    EventInfo,
    RoundInfo,
    RunInfo,
    StoredMask,
    aware,
)
from server.store.rows import unpack_blob

MIN_ID_PREFIX = 4


class RunQueries(StoreBase):
    """Read-only queries over a run store; every call is one short read transaction."""

    # ------------------------------------------------------------------ runs
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
        created = aware(run.created_at)
        assert created is not None
        heartbeat = aware(run.heartbeat_at)
        return RunInfo(
            id=run.id,
            name=run.name,
            config=dict(run.config),
            seed=run.seed,
            code_version=run.code_version,
            status=run.status,
            created_at=created,
            finished_at=aware(run.finished_at),
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
                    created_at=aware(r.created_at) or r.created_at,
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
                    created_at=aware(e.created_at) or e.created_at,
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
            data = unpack_blob(m.blob, m.sha256, m.size, f"mask of run {run_id} round {m.round}")
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
            return c.round, unpack_blob(c.blob, c.sha256, c.size, where)
