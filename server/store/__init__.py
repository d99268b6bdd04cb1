"""The run store: SQLAlchemy models, Alembic-managed schema and the RunStore API."""

from server.store.errors import (
    CheckpointCorruptError,
    NotAStoreError,
    RunActiveError,
    RunNotFoundError,
    SchemaTooNewError,
    SchemaTooOldError,
    SecretInConfigError,
    StoreError,
)
from server.store.redaction import find_secrets, redact_secrets
from server.store.schema import check_schema, head_revision, upgrade
from server.store.store import (
    CheckpointSignature,
    ClientResultInfo,
    EventInfo,
    RoundInfo,
    RunInfo,
    RunStore,
    StoredMask,
)
from server.store.urls import ENV_VAR, resolve_db_url

__all__ = [
    "ENV_VAR",
    "CheckpointCorruptError",
    "CheckpointSignature",
    "ClientResultInfo",
    "NotAStoreError",
    "RunActiveError",
    "EventInfo",
    "RoundInfo",
    "RunInfo",
    "RunNotFoundError",
    "RunStore",
    "SchemaTooNewError",
    "SchemaTooOldError",
    "SecretInConfigError",
    "StoreError",
    "StoredMask",
    "find_secrets",
    "check_schema",
    "head_revision",
    "redact_secrets",
    "resolve_db_url",
    "upgrade",
]
