"""Engines and schema versioning: open a URL safely and run Alembic migrations programmatically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

from server.store.errors import NotAStoreError, SchemaTooNewError, SchemaTooOldError, StoreError
from server.store.urls import is_sqlite_memory, parse_url, safe_url

# Located next to the `server` package so it ships inside the wheel; no alembic.ini needed.
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
DEFAULT_CONNECT_TIMEOUT_S = 5


def alembic_config(connection: Connection | None = None, url: str | None = None) -> Config:
    """An Alembic Config built in code (works from an installed package, no alembic.ini)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    """The newest schema revision this leanfed knows."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, f"no Alembic revisions under {MIGRATIONS_DIR}"
    return head


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # SQLite ignores foreign keys unless asked, per connection.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _pg_read_only(dbapi_conn: Any, _record: Any) -> None:
    # Every transaction of a read-only engine refuses writes, on the server side.
    cur = dbapi_conn.cursor()
    cur.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
    cur.close()
    dbapi_conn.commit()


def make_engine(
    url: str, *, connect_timeout_s: int = DEFAULT_CONNECT_TIMEOUT_S, read_only: bool = False
) -> Engine:
    """An engine for `url` (SQLite or PostgreSQL) with a short connect timeout; lazy, no I/O.

    ``read_only``: SQLite opens the file with ``mode=ro`` (never creates it, never writes a
    journal); PostgreSQL sessions are READ ONLY.
    """
    parsed: URL = parse_url(url)
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        if is_sqlite_memory(parsed):
            # One in-memory database per engine: every checkout must share the same connection.
            kwargs["poolclass"] = StaticPool
            kwargs["connect_args"] = {"check_same_thread": False}
        else:
            path = Path(parsed.database or "")
            if not path.parent.exists():
                raise StoreError(
                    f"cannot open SQLite database {path}: directory {path.parent} does not exist"
                )
            kwargs["connect_args"] = {"timeout": 30}
            if read_only:
                # SQLite URI filename: mode=ro refuses to create or write the file.
                parsed = parsed.set(
                    database=f"file:{path}", query={**parsed.query, "mode": "ro", "uri": "true"}
                )
    else:
        kwargs["connect_args"] = {"connect_timeout": connect_timeout_s}
        kwargs["pool_pre_ping"] = True
    engine = create_engine(parsed, **kwargs)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    elif read_only:
        event.listen(engine, "connect", _pg_read_only)
    return engine


def connect_error(engine: Engine, exc: BaseException) -> StoreError:
    """A one-line StoreError naming the host (or file) that could not be reached."""
    url = engine.url
    orig = getattr(exc, "orig", None) or exc
    detail = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    if url.get_backend_name() == "sqlite":
        where = f"SQLite file {url.database}"
    else:
        where = f"host {url.host or 'localhost'}:{url.port or 5432}"
    return StoreError(f"cannot connect to the database at {where} ({safe_url(url)}): {detail}")


def current_revision(connection: Connection) -> str | None:
    """The Alembic revision recorded in the database, None for an empty database."""
    return MigrationContext.configure(connection).get_current_revision()


def check_schema(engine: Engine) -> str:
    """The database's revision, which must be this leanfed's head; never creates or migrates.

    For read-only commands: NotAStoreError when the database holds no leanfed store,
    SchemaTooNewError / SchemaTooOldError when it is at another leanfed's revision.
    """
    where = safe_url(engine.url)
    head = head_revision()
    try:
        with engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
            current = current_revision(conn) if "alembic_version" in tables else None
    except (OperationalError, DBAPIError) as exc:
        if _is_connect_failure(exc) and "not a database" not in _first_line(exc):
            raise connect_error(engine, exc) from exc
        raise NotAStoreError(f"{where} is not a leanfed run store ({_first_line(exc)})") from exc
    except SQLAlchemyError as exc:
        raise StoreError(f"reading {where} failed: {_first_line(exc)}") from exc
    if current is None or "runs" not in tables:
        raise NotAStoreError(
            f"{where} is not a leanfed run store (no leanfed tables); "
            "check --db / LEANFED_DB_URL"
        )
    known = [s.revision for s in ScriptDirectory.from_config(alembic_config()).walk_revisions()]
    if current not in known:
        raise SchemaTooNewError(
            f"database schema revision {current} at {where} is newer than this leanfed "
            f"(it knows revisions up to {head}); upgrade leanfed"
        )
    if current != head:
        raise SchemaTooOldError(
            f"database schema revision {current} at {where} is older than this leanfed's "
            f"{head}; read commands never migrate: run `leanfed runs upgrade` on it first"
        )
    return current


def upgrade(target: str | Engine) -> str:
    """Bring the database to the newest schema in one transaction; return the revision.

    Raises SchemaTooNewError when the database carries a revision this leanfed does not know
    (written by a newer version) instead of touching it, and StoreError when it is unreachable.
    """
    engine = make_engine(target) if isinstance(target, str) else target
    cfg = alembic_config()
    script = ScriptDirectory.from_config(cfg)
    head = head_revision()
    try:
        with engine.begin() as conn:
            current = current_revision(conn)
            if current is not None and current not in {s.revision for s in script.walk_revisions()}:
                raise SchemaTooNewError(
                    f"database schema revision {current} is newer than this leanfed "
                    f"(it knows revisions up to {head}) at {safe_url(engine.url)}; "
                    "upgrade leanfed or point --db / LEANFED_DB_URL at another database"
                )
            if current != head:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
    except StoreError:
        raise
    except (OperationalError, DBAPIError) as exc:
        if getattr(exc, "connection_invalidated", False) or _is_connect_failure(exc):
            raise connect_error(engine, exc) from exc
        raise StoreError(f"migrating {safe_url(engine.url)} failed: {_first_line(exc)}") from exc
    except SQLAlchemyError as exc:
        raise StoreError(f"migrating {safe_url(engine.url)} failed: {_first_line(exc)}") from exc
    finally:
        if isinstance(target, str):
            engine.dispose()
    return head


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _is_connect_failure(exc: DBAPIError) -> bool:
    # psycopg raises OperationalError("connection failed: ...") before any statement runs.
    text = str(exc.orig).lower() if exc.orig is not None else str(exc).lower()
    return exc.statement is None or any(
        s in text
        for s in (
            "connection failed",
            "could not connect",
            "connection refused",
            "timeout",
            "unable to open database file",
            "could not translate host name",
        )
    )
