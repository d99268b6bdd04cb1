"""Exceptions raised by the run store; every message names the run, key or host at fault."""

from __future__ import annotations


class StoreError(RuntimeError):
    """Any failure of the run store that a user can act on (bad URL, schema, missing run)."""


class RunNotFoundError(StoreError, LookupError):
    """No stored run has the given id (or the id prefix is ambiguous)."""


class SchemaTooNewError(StoreError):
    """The database was written by a newer leanfed whose Alembic revision we do not know."""


class SchemaTooOldError(StoreError):
    """A read-only command met a database at an older schema revision (it never migrates)."""


class NotAStoreError(StoreError):
    """The database holds no leanfed run store (no leanfed tables, or not a database at all)."""


class RunActiveError(StoreError):
    """The run is being written by a live process (fresh heartbeat): not resumable or deletable."""


class CheckpointCorruptError(StoreError):
    """A stored blob does not decompress, does not match its SHA-256, or is not a checkpoint."""


class SecretInConfigError(StoreError, ValueError):
    """A run config holds a key or value that looks secret; secrets never enter the store."""
