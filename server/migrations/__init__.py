"""Alembic migrations of the run store; run programmatically by `server.store.schema.upgrade`."""
