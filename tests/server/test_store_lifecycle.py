"""Run lifecycle in the store: read-only opening, heartbeat and staleness, delete, secrets."""

from __future__ import annotations

import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from typer.testing import CliRunner

from server.store import (
    NotAStoreError,
    RunActiveError,
    RunNotFoundError,
    RunStore,
    SchemaTooNewError,
    SchemaTooOldError,
    SecretInConfigError,
    StoreError,
)
from server.store.liveness import STALE_AFTER_S
from server.store.models import Run, utcnow
from server.store.schema import alembic_config, make_engine
from server.store.urls import sqlite_file_url
from simulations.cli import app
from tests.server.test_store import _round, db_url, store  # noqa: F401  (fixtures)


def _file_store(tmp_path: Path) -> tuple[str, RunStore]:
    url = sqlite_file_url(tmp_path / "runs.db")
    return url, RunStore(url)


# ----------------------------------------------------------------- read-only opening
@pytest.mark.parametrize("content", [b"", b"patient,age\nalice,51\n"])
def test_read_only_refuses_a_file_that_is_not_a_store(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "other.db"
    path.write_bytes(content)
    with pytest.raises(NotAStoreError, match="is not a leanfed run store") as err:
        RunStore(sqlite_file_url(path), read_only=True)
    assert "alice" not in str(err.value) and "\n" not in str(err.value)
    assert path.read_bytes() == content  # nothing created, nothing migrated
    res = CliRunner().invoke(app, ["runs", "list", "--db", str(path)])
    assert res.exit_code == 1 and res.output.startswith("error: ") and res.output.count("\n") == 1


def test_read_only_refuses_foreign_tables_and_creates_nothing(tmp_path: Path) -> None:
    url = sqlite_file_url(tmp_path / "app.db")
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE patients (id INTEGER, name TEXT)"))
    with pytest.raises(NotAStoreError, match="no leanfed tables"):
        RunStore(url, read_only=True)
    with engine.connect() as conn:
        assert sa.inspect(conn).get_table_names() == ["patients"]
    engine.dispose()


def test_read_only_refuses_older_and_newer_schemas_then_upgrade_keeps_runs(
    tmp_path: Path,
) -> None:
    url = sqlite_file_url(tmp_path / "old.db")
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        cfg = alembic_config(conn)
        command.upgrade(cfg, "0001")  # a store written by the first leanfed
        conn.execute(
            sa.text(
                "INSERT INTO runs (id, name, config, code_version, status, created_at) "
                "VALUES ('a' || hex(randomblob(15)) || 'b', 'old', '{}', 'v0', 'failed', "
                "'2026-01-01 00:00:00')"
            )
        )
    with pytest.raises(SchemaTooOldError, match="0001 .* older than this leanfed"):
        RunStore(url, read_only=True)
    with engine.connect() as conn:  # still at 0001: read commands never migrate
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == "0001"
    res = CliRunner().invoke(app, ["runs", "upgrade", "--db", url])
    assert res.exit_code == 0, res.output
    with RunStore(url, read_only=True) as ro:
        (run,) = ro.list_runs()
        assert (run.name, run.status, run.heartbeat_at, run.reason) == ("old", "failed", None, None)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = 'f00dfeed9999'"))
    with pytest.raises(SchemaTooNewError, match="newer than this leanfed"):
        RunStore(url, read_only=True)
    engine.dispose()


def test_read_only_store_cannot_write(db_url: str) -> None:  # noqa: F811
    if db_url == "sqlite://":
        pytest.skip("a private in-memory database cannot be opened twice")
    RunStore(db_url).close()  # create the schema
    with RunStore(db_url, read_only=True) as ro, pytest.raises(StoreError):
        ro.create_run({"rounds": 1})


def test_read_only_sqlite_never_creates_a_file(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no leanfed database"):
        RunStore(sqlite_file_url(tmp_path / "none.db"), read_only=True)
    assert list(tmp_path.iterdir()) == []
    make_engine(sqlite_file_url(tmp_path / "none.db"), read_only=True).dispose()
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------- heartbeat, stale, resume
def _set(target: RunStore, run_id: str, **values: Any) -> None:
    with target.engine.begin() as conn:
        conn.execute(sa.update(Run).where(Run.id == run_id).values(**values))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_heartbeat_and_stale_detection(store: RunStore) -> None:  # noqa: F811
    run = store.create_run({"rounds": 3})
    info = store.get_run(run)
    assert info.heartbeat_at is not None and not info.stale and info.display_status == "running"
    with pytest.raises(RunActiveError, match="running in another process"):
        store.reopen_run(run)  # a live run is not resumable ...
    with pytest.raises(RunActiveError):
        store.delete_run(run)  # ... nor deletable
    assert store.get_run(run).status == "running"

    old = utcnow() - timedelta(seconds=STALE_AFTER_S + 5)
    _set(store, run, heartbeat_at=old, owner="elsewhere:1")
    assert store.get_run(run).display_status == "stale"
    store.heartbeat(run)  # a fresh heartbeat makes it live again
    assert not store.get_run(run).stale

    _set(store, run, owner=f"{socket.gethostname()[:80]}:{_dead_pid()}")  # its process died
    assert store.get_run(run).stale
    assert store.check_resumable(run) == 0
    assert store.reopen_run(run) == 0
    info = store.get_run(run)
    assert info.status == "running" and not info.stale and info.owner and info.owner.endswith(
        f":{__import__('os').getpid()}"
    )


def test_refused_resume_keeps_the_status_and_reason_is_stored(store: RunStore) -> None:  # noqa: F811
    run = store.create_run({"rounds": 3})
    _round(store, run, 1, num_accepted=0, degraded=True)
    store.finish_run(run, "degraded", reason="1 of 1 rounds had fewer than 2 accepted replies")
    for _ in range(2):
        with pytest.raises(StoreError, match="already degraded; nothing to resume"):
            store.reopen_run(run)
    info = store.get_run(run)
    reason = "1 of 1 rounds had fewer than 2 accepted replies"
    assert (info.status, info.reason) == ("degraded", reason)
    (rnd,) = store.get_rounds(run)
    assert (rnd.num_accepted, rnd.degraded) == (0, True)
    other = store.create_run({"rounds": 3})
    store.finish_run(other, "failed", reason="DatasetError: see postgresql://bob:hunter2@db/x")
    assert "hunter2" not in (store.get_run(other).reason or "")


def test_delete_removes_the_run_and_only_it(store: RunStore) -> None:  # noqa: F811
    keep, gone = store.create_run({"rounds": 2}), store.create_run({"rounds": 2})
    for run in (keep, gone):
        _round(store, run, 1)
        store.finish_run(run, "completed")
    store.delete_run(gone)
    with pytest.raises(RunNotFoundError):
        store.get_run(gone)
    assert [r.id for r in store.list_runs()] == [keep]
    with store.engine.connect() as conn:
        for table in ("rounds", "client_results", "consensus_masks", "checkpoints", "events"):
            ids = conn.execute(sa.text(f"SELECT DISTINCT run_id FROM {table}")).scalars().all()
            assert ids == [keep], table


def test_runs_delete_command_asks_first(tmp_path: Path) -> None:
    url, s = _file_store(tmp_path)
    run = s.create_run({"rounds": 1})
    s.finish_run(run, "interrupted")
    s.close()
    res = CliRunner().invoke(app, ["runs", "delete", run[:8], "--db", url], input="n\n")
    assert res.exit_code == 1 and "not deleted" in res.output
    res = CliRunner().invoke(app, ["runs", "delete", run[:8], "--db", url, "--yes"])
    assert res.exit_code == 0 and f"deleted run {run}" in res.output
    with RunStore(url) as s2:
        assert s2.list_runs() == []


def test_runs_list_and_show_say_stale_and_why(tmp_path: Path) -> None:
    url, s = _file_store(tmp_path)
    run = s.create_run({"rounds": 3})
    _set(s, run, heartbeat_at=utcnow() - timedelta(hours=1), owner="elsewhere:1")
    failed = s.create_run({"rounds": 3})
    s.finish_run(failed, "failed", reason="every round rejected every site (3 rounds)")
    s.close()
    runner = CliRunner(env={"COLUMNS": "250"})
    res = runner.invoke(app, ["runs", "list", "--db", url])
    assert res.exit_code == 0 and "stale" in res.output and "failed" in res.output
    res = runner.invoke(app, ["runs", "show", run, "--db", url])
    assert res.exit_code == 0 and "stale" in res.output and f"--resume {run}" in res.output
    res = runner.invoke(app, ["runs", "show", failed, "--db", url])
    assert "every round rejected every site" in res.output


# ----------------------------------------------------------------- secrets
@pytest.mark.parametrize(
    "config",
    [
        {"db.pw": "hunter2"},
        {"pass": "hunter2"},
        {"auth": "hunter2"},
        {"mirror.dsn": "hunter2"},
        {"jwt": "hunter2"},
        {"bearer": "hunter2"},
        {"connection-string": "hunter2"},
        {"header": "Bearer hunter2hunter2"},
        {"source": "https://example.org/data.csv?password=hunter2"},
        {"dataset": "csv:/x.csv?user=a&api_key=hunter2"},
        {"note": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJodW50ZXIyIn0.c2lnbmF0dXJl"},
        {"site": "host=db password=hunter2"},
    ],
)
def test_new_secret_shapes_refused_by_key(store: RunStore, config: dict[str, Any]) -> None:  # noqa: F811
    with pytest.raises(SecretInConfigError, match="never enter the store") as err:
        store.create_run({"rounds": 3, **config})
    (key,) = config
    assert key in str(err.value) and "hunter2" not in str(err.value)
    assert store.list_runs() == []


def test_secret_run_name_refused_and_site_data_masked(store: RunStore) -> None:  # noqa: F811
    with pytest.raises(SecretInConfigError, match=r": name \(") as err:
        store.create_run({"rounds": 3}, name="https://bob:hunter2@host/x")
    assert "hunter2" not in str(err.value)
    run = store.create_run({"rounds": 3}, name="plain")
    _round(
        store,
        run,
        1,
        metrics={"accuracy": 0.5, "password": "hunter2"},
        client_results=[
            {"node_id": 1, "accepted": False, "reason": "sent https://u:hunter2@evil/x"},
            {"node_id": 2, "accepted": True, "metrics": {"api_key": "hunter2"}},
        ],
        events=[{"kind": "drift", "detail": {"note": "Bearer hunter2hunter2"}}],
    )
    stored = repr(
        (store.get_rounds(run), store.get_client_results(run), store.get_events(run))
    )
    assert "hunter2" not in stored and "[redacted]" in stored
