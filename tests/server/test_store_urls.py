"""Tests of database URL resolution and of secret detection in run configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.store import find_secrets, redact_secrets, resolve_db_url
from server.store.redaction import is_secret_key
from server.store.urls import ENV_VAR, parse_url


def test_resolve_order_cli_env_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_db_url(None, cwd=tmp_path) == f"sqlite:///{tmp_path.resolve()}/leanfed.db"
    monkeypatch.setenv(ENV_VAR, "postgresql://u@db:5432/x")
    assert resolve_db_url(None) == "postgresql://u@db:5432/x"
    assert resolve_db_url("sqlite://") == "sqlite://"  # the CLI wins over the env
    assert resolve_db_url(str(tmp_path / "r.db")) == f"sqlite:///{tmp_path.resolve()}/r.db"


def test_plain_postgres_urls_use_psycopg3() -> None:
    assert parse_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert parse_url("postgres://u@h/db").drivername == "postgresql+psycopg"


@pytest.mark.parametrize(
    "key",
    [
        "password",
        "DB_PASSWORD",
        "apiKey",
        "api-key",
        "secret",
        "aws.secret-access-key",
        "access_token",
        "hf-token",
        "private_key",
        "ssh-key",
        "credentials",
        "passphrase",
    ],
)
def test_secret_keys(key: str) -> None:
    assert is_secret_key(key)


@pytest.mark.parametrize(
    "key",
    [
        "num-server-rounds",
        "max-token-len",
        "num-tokens",
        "dataset-key",
        "key",
        "density",
        "keyframe",
        "monkey",
        "tokenizer",
        "local-steps",
    ],
)
def test_ordinary_keys(key: str) -> None:
    assert not is_secret_key(key)


def test_find_and_redact_nested() -> None:
    config = {
        "rounds": 3,
        "db": {"url": "postgresql://u:pw@h/x", "pool": 2},
        "clients": [{"token": "t"}, "-----BEGIN PRIVATE KEY-----"],
        "api_key": "k",
    }
    assert find_secrets(config) == ["db.url", "clients[0].token", "clients[1]", "api_key"]
    assert redact_secrets(config) == {"rounds": 3, "db": {"pool": 2}, "clients": [{}]}
    assert find_secrets({"rounds": 3, "strategy": {"density": 0.1}}) == []
