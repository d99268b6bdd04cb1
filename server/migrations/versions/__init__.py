"""Alembic revision scripts of the run store, oldest first (r0001_initial_schema ...)."""
