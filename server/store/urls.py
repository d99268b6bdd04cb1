"""Database URL resolution: CLI `--db`, then env LEANFED_DB_URL, then ./leanfed.db (SQLite)."""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from server.store.errors import StoreError

ENV_VAR = "LEANFED_DB_URL"
DEFAULT_DB_FILENAME = "leanfed.db"


def resolve_db_url(cli_value: str | None, *, cwd: Path | None = None) -> str:
    """The database URL to use: `cli_value`, else $LEANFED_DB_URL, else SQLite `./leanfed.db`.

    A bare file path (no "://") is taken as a SQLite file, so `--db runs.db` works.
    """
    value = cli_value if cli_value else os.environ.get(ENV_VAR) or None
    if value is None:
        return sqlite_file_url((cwd or Path.cwd()) / DEFAULT_DB_FILENAME)
    if "://" not in value:
        return sqlite_file_url(Path(value))
    return value


def sqlite_file_url(path: Path) -> str:
    """A SQLAlchemy URL for a SQLite file (absolute, so later `chdir`s do not move it)."""
    return f"sqlite:///{path.expanduser().resolve()}"


def parse_url(url: str) -> URL:
    """Parse and normalise a URL; plain `postgresql://` and `postgres://` use psycopg 3."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError, TypeError) as exc:
        # Never echo the text: a mistyped URL may still carry a password.
        raise StoreError(
            "invalid database URL (expected sqlite:///FILE, a SQLite file path, or "
            "postgresql://USER@HOST:PORT/DB)"
        ) from exc
    if parsed.drivername in ("postgresql", "postgres"):
        # psycopg2 is not a dependency; psycopg (3) is.
        parsed = parsed.set(drivername="postgresql+psycopg")
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise StoreError(
            f"unsupported database URL scheme {parsed.drivername!r} in {safe_url(parsed)}; "
            "use sqlite:///FILE or postgresql://USER@HOST:PORT/DB"
        )
    return parsed


def safe_url(url: URL | str) -> str:
    """The URL as text with any password masked, fit for error messages and logs."""
    parsed = url if isinstance(url, URL) else make_url(url)
    return parsed.render_as_string(hide_password=True)


def is_sqlite_memory(url: URL) -> bool:
    """True for `sqlite://` and `sqlite:///:memory:` (one private database per engine)."""
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")
