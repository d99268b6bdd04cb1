"""StoreBase: the run store's connection, schema check and one-transaction-per-call sessions."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Self

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from server.store.errors import RunNotFoundError, StoreError
from server.store.models import Run
from server.store.schema import (
    DEFAULT_CONNECT_TIMEOUT_S,
    check_schema,
    connect_error,
    make_engine,
    upgrade,
)
from server.store.urls import parse_url, safe_url


class StoreBase:
    """Connection to a run database; RunStore adds the reads and writes.

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

    def __enter__(self) -> Self:
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


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
