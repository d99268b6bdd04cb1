"""Contract tests of RunStore, run unchanged against SQLite (memory, file) and PostgreSQL."""

from __future__ import annotations

import hashlib
import os
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

import server.store.store as store_module
from server.store import (
    CheckpointCorruptError,
    RunNotFoundError,
    RunStore,
    SchemaTooNewError,
    SecretInConfigError,
    StoreError,
    head_revision,
    upgrade,
)
from server.store.models import Base, Event
from server.store.urls import sqlite_file_url

PG_URL = os.environ.get("LEANFED_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
TABLES = {"runs", "rounds", "client_results", "consensus_masks", "checkpoints", "events"}


def require_postgres(url: str) -> None:
    """Skip when PostgreSQL is unreachable, but FAIL when LEANFED_REQUIRE_POSTGRES=1 (CI)."""
    engine = sa.create_engine(url, connect_args={"connect_timeout": 2})
    try:
        with engine.connect():
            pass
    except sa.exc.OperationalError as exc:
        msg = f"PostgreSQL at {engine.url.host}:{engine.url.port} unreachable: {exc.orig}"
        if os.environ.get("LEANFED_REQUIRE_POSTGRES") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    finally:
        engine.dispose()


@pytest.fixture(
    params=["sqlite-memory", "sqlite-file", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite-memory":
        yield "sqlite://"
    elif request.param == "sqlite-file":
        yield sqlite_file_url(tmp_path / "leanfed.db")
    else:
        require_postgres(PG_URL)
        # A private schema per test (first on search_path), dropped afterwards: tests never
        # see each other's rows and the shared `test` database stays clean.
        schema = f"leanfed_test_{uuid.uuid4().hex[:12]}"
        admin = sa.create_engine(PG_URL)
        with admin.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        url = sa.make_url(PG_URL).update_query_dict({"options": f"-csearch_path={schema}"})
        try:
            yield url.render_as_string(hide_password=False)
        finally:
            with admin.begin() as conn:
                conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
            admin.dispose()


@pytest.fixture
def store(db_url: str) -> Iterator[RunStore]:
    s = RunStore(db_url)
    yield s
    s.close()


def _round(store: RunStore, run_id: str, rnd: int, **overrides: Any) -> None:
    kwargs: dict[str, Any] = {
        "metrics": {"accuracy": 0.5 + rnd / 10, "train_loss": 1.0 / rnd},
        "upload_bytes": 100 * rnd,
        "download_bytes": 200 * rnd,
        "wall_s": 0.5,
        "density": 0.1,
        "client_results": [
            {"node_id": 2**64 - 1, "accepted": True, "upload_bytes": 60, "download_bytes": 100},
            {"node_id": 7, "accepted": False, "reason": "density 0.9 above bound 0.2"},
        ],
        "mask_blob": bytes([rnd]) * 16,
        "layer_densities": {"conv.weight": 0.2, "fc.weight": 0.05 * rnd},
        "checkpoint": f"weights-{rnd}".encode() * 50,
        "events": [{"kind": "drift", "node_id": 7, "detail": {"p_value": 0.001}}],
    }
    kwargs.update(overrides)
    store.record_round(run_id, rnd, **kwargs)


def _counts(store: RunStore) -> dict[str, int]:
    with store.engine.connect() as conn:
        return {
            t: int(conn.execute(sa.text(f"SELECT COUNT(*) FROM {t}")).scalar_one()) for t in TABLES
        }


class TestRunStoreContract:
    """Every backend must pass every test here unchanged (cf. Flower's linkstate_test.py)."""

    def test_empty_database_migrates_to_head(self, store: RunStore) -> None:
        assert store.schema_revision == head_revision()
        with store.engine.connect() as conn:
            assert MigrationContext.configure(conn).get_current_revision() == head_revision()
            assert set(sa.inspect(conn).get_table_names()) >= TABLES
        assert upgrade(store.engine) == head_revision()  # idempotent on an up-to-date DB

    def test_models_match_migrations(self, store: RunStore) -> None:
        with store.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == []

    def test_create_list_show(self, store: RunStore) -> None:
        assert store.list_runs() == []
        a = store.create_run({"rule": "rigl", "density": 0.1}, seed=1, name="a")
        b = store.create_run({"rule": "dense"}, seed=2)
        assert len(a) == 32 and a != b
        runs = store.list_runs()
        assert {r.id for r in runs} == {a, b}
        info = store.get_run(a)
        assert (info.name, info.seed, info.status) == ("a", 1, "running")
        assert info.config == {"rule": "rigl", "density": 0.1}
        assert info.code_version and info.created_at.tzinfo is not None
        assert (info.last_round, info.num_rounds, info.final_accuracy) == (None, 0, None)
        assert store.get_run(b).name == f"run-{b[:8]}"
        store.finish_run(a, "completed")
        done = store.get_run(a)
        assert done.status == "completed" and done.finished_at is not None
        with pytest.raises(StoreError, match="status must be one of"):
            store.finish_run(b, "exploded")

    def test_round_round_trip(self, store: RunStore) -> None:
        run = store.create_run({"x": 1}, seed=0, name="r")
        for rnd in (1, 2, 3):
            _round(store, run, rnd)
        rounds = store.get_rounds(run)
        assert [r.round for r in rounds] == [1, 2, 3]
        assert rounds[2].accuracy == pytest.approx(0.8)
        assert rounds[2].train_loss == pytest.approx(1 / 3)
        assert (rounds[2].upload_bytes, rounds[2].download_bytes) == (300, 600)
        info = store.get_run(run)
        assert (info.last_round, info.num_rounds) == (3, 3)
        assert info.final_accuracy == pytest.approx(0.8)
        clients = store.get_client_results(run, round=2)
        assert [c.node_id for c in clients] == [str(2**64 - 1), "7"]  # uint64 survives
        assert [c.accepted for c in clients] == [True, False]
        assert clients[1].reason == "density 0.9 above bound 0.2"
        assert len(store.get_client_results(run)) == 6
        events = store.get_events(run, kind="drift")
        assert [(e.round, e.node_id) for e in events] == [(1, "7"), (2, "7"), (3, "7")]
        assert events[0].detail == {"p_value": 0.001}
        assert (
            store.get_events(run, round=2)[0].round == 2 and store.get_events(run, kind="x") == []
        )
        mask = store.get_mask(run, 2)
        assert mask is not None and mask.data == bytes([2]) * 16
        assert mask.layer_densities == {"conv.weight": 0.2, "fc.weight": pytest.approx(0.1)}
        latest = store.get_mask(run)
        assert latest is not None and latest.round == 3
        assert [r for r, _ in store.get_layer_densities(run)] == [1, 2, 3]
        assert store.latest_checkpoint(run) == (3, b"weights-3" * 50)
        assert store.get_checkpoint(run, 1) == b"weights-1" * 50

    def test_round_without_optional_parts(self, store: RunStore) -> None:
        run = store.create_run({})
        store.record_round(
            run, 0, metrics={"loss": float("nan")}, upload_bytes=0, download_bytes=0, wall_s=0.0
        )
        (rnd,) = store.get_rounds(run)
        assert rnd.metrics == {"loss": None}  # JSON has no NaN: stored as null
        assert rnd.accuracy is None and rnd.density is None
        assert store.get_mask(run) is None and store.latest_checkpoint(run) is None
        store.record_event(run, "error", detail={"msg": "client 3 timed out"})
        (ev,) = store.get_events(run)
        assert (ev.kind, ev.round, ev.detail["msg"]) == ("error", None, "client 3 timed out")

    def test_atomic_round_failure_writes_nothing(
        self, store: RunStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        run = store.create_run({"x": 1})
        _round(store, run, 1)
        before = _counts(store)

        # The events are the LAST rows of the round: make the database reject one (NOT NULL
        # kind) after the round, client, mask and checkpoint rows were already flushed.
        def bad_event(*_: Any, **__: Any) -> Event:
            return Event(run_id=run, round=2, kind=None, detail={})

        monkeypatch.setattr(store_module, "event_row", bad_event)
        with pytest.raises(StoreError):
            _round(store, run, 2)
        assert _counts(store) == before
        assert store.get_run(run).last_round == 1
        assert [r.round for r in store.get_rounds(run)] == [1]
        assert store.get_mask(run, 2) is None
        monkeypatch.undo()
        _round(store, run, 2)  # the store is still usable and round 2 can be retried
        assert _counts(store)["rounds"] == 2

    def test_bad_round_input_rejected_before_writing(self, store: RunStore) -> None:
        run = store.create_run({})
        before = _counts(store)
        bad: list[dict[str, Any]] = [
            {"client_results": [{"node_id": 1}]},  # no 'accepted'
            {"client_results": [{"node_id": 1, "accepted": True, "weights": 1}]},
            {"events": [{"kind": ""}]},
            {"upload_bytes": -1},
            {"metrics": {"obj": object()}},
            {"mask_blob": None, "layer_densities": {"w": 0.5}},
            {"checkpoint": "not bytes"},
        ]
        for override in bad:
            with pytest.raises(StoreError):
                _round(store, run, 1, **override)
        assert _counts(store) == before

    def test_duplicate_round_and_finished_run_rejected(self, store: RunStore) -> None:
        run = store.create_run({})
        _round(store, run, 1)
        with pytest.raises(StoreError, match="already has round 1"):
            _round(store, run, 1, checkpoint=b"other")
        assert store.latest_checkpoint(run) == (1, b"weights-1" * 50)
        store.finish_run(run, "interrupted")
        with pytest.raises(StoreError, match="interrupted"):
            _round(store, run, 2)

    def test_unknown_run(self, store: RunStore) -> None:
        missing = uuid.uuid4().hex
        for call in (
            lambda: store.get_run(missing),
            lambda: store.get_rounds(missing),
            lambda: store.latest_checkpoint(missing),
            lambda: store.finish_run(missing, "failed"),
            lambda: _round(store, missing, 1),
        ):
            with pytest.raises(RunNotFoundError, match=missing):
                call()

    def test_resolve_run_id(self, store: RunStore) -> None:
        run = store.create_run({})
        assert store.resolve_run_id(run) == run
        assert store.resolve_run_id(run[:6].upper()) == run
        with pytest.raises(RunNotFoundError):
            store.resolve_run_id(run[:3])  # too short to be a prefix
        with pytest.raises(RunNotFoundError):
            store.resolve_run_id("zzzzzz")

    def test_checkpoint_sha256_verified_and_corruption_detected(self, store: RunStore) -> None:
        run = store.create_run({})
        _round(store, run, 1)
        data = b"weights-1" * 50
        assert store.checkpoint_sha256(run) == (1, hashlib.sha256(data).hexdigest())
        assert store.latest_checkpoint(run) == (1, data)
        table = sa.table("checkpoints", sa.column("run_id"), sa.column("blob", sa.LargeBinary))
        with store.engine.begin() as conn:  # a bit flip that still decompresses
            conn.execute(table.update().values(blob=zlib.compress(b"weights-X" * 50)))
        with pytest.raises(CheckpointCorruptError, match="SHA-256"):
            store.latest_checkpoint(run)
        with store.engine.begin() as conn:  # bytes that no longer decompress
            conn.execute(table.update().values(blob=b"\x00garbage"))
        with pytest.raises(CheckpointCorruptError, match="decompress"):
            store.get_checkpoint(run, 1)

    def test_newer_schema_revision_is_refused(self, store: RunStore, db_url: str) -> None:
        with store.engine.begin() as conn:
            conn.execute(sa.text("UPDATE alembic_version SET version_num = 'f00dfeed9999'"))
        with pytest.raises(SchemaTooNewError, match="f00dfeed9999 is newer than this leanfed"):
            upgrade(store.engine)
        if db_url != "sqlite://":  # a fresh in-memory engine would be a new, empty database
            with pytest.raises(SchemaTooNewError, match="newer than this leanfed"):
                RunStore(db_url)

    @pytest.mark.parametrize(
        "config",
        [
            {"db-password": "hunter2"},
            {"auth": {"api_key": "hunter2"}},
            {"hf_token": "hunter2"},
            {"tls": {"privateKey": "hunter2"}},
            {"cert": "-----BEGIN RSA PRIVATE KEY-----\nhunter2"},
            {"mirror": "postgresql://bob:hunter2@db/x"},
            {"client-secret": "hunter2"},
        ],
    )
    def test_secrets_rejected(self, store: RunStore, config: dict[str, Any]) -> None:
        with pytest.raises(SecretInConfigError, match="never enter the store") as err:
            store.create_run({"rounds": 3, **config})
        assert "hunter2" not in str(err.value)  # the message names keys, never values
        assert store.list_runs() == []


# ----------------------------------------------------------------- backend-independent checks
def test_unreachable_postgres_names_host_and_hides_password() -> None:
    url = "postgresql://bob:s3cret@127.0.0.1:1/leanfed"  # port 1: refused at once
    with pytest.raises(StoreError, match=r"host 127\.0\.0\.1:1") as err:
        RunStore(url, connect_timeout_s=2)
    assert "s3cret" not in str(err.value) and "***" in str(err.value)


def test_sqlite_missing_directory_and_must_exist(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        RunStore(sqlite_file_url(tmp_path / "nope" / "x.db"))
    with pytest.raises(StoreError, match="no leanfed database"):
        RunStore(sqlite_file_url(tmp_path / "x.db"), must_exist=True)
    assert not (tmp_path / "x.db").exists()


def test_unsupported_scheme() -> None:
    with pytest.raises(StoreError, match="unsupported database URL scheme"):
        RunStore("mysql://u@h/db")
    with pytest.raises(StoreError, match="invalid database URL"):
        RunStore("::not a url::/x://")


def test_require_postgres_fails_in_ci_and_skips_locally(monkeypatch: pytest.MonkeyPatch) -> None:
    bad = "postgresql+psycopg://postgres@127.0.0.1:1/test"
    monkeypatch.setenv("LEANFED_REQUIRE_POSTGRES", "1")
    with pytest.raises(pytest.fail.Exception, match="unreachable"):
        require_postgres(bad)
    monkeypatch.delenv("LEANFED_REQUIRE_POSTGRES")
    with pytest.raises(pytest.skip.Exception):
        require_postgres(bad)
