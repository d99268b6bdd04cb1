"""Exceptions raised by the run store; every message names the run, key or host at fault."""

from __future__ import annotations


class StoreError(RuntimeError):
    """Any failure of the run store that a user can act on (bad URL, schema, missing run)."""


class RunNotFoundError(StoreError, LookupError):
    """No stored run has the given id (or the id prefix is ambiguous)."""


class SchemaTooNewError(StoreError):
    """The database was written by a newer leanfed whose Alembic revision we do not know."""


class CheckpointCorruptError(StoreError):
    """A stored blob does not decompress or its SHA-256 does not match the recorded one."""


class SecretInConfigError(StoreError, ValueError):
    """A run config holds a key or value that looks secret; secrets never enter the store."""
