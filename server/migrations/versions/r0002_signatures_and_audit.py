"""Signed checkpoints and the run's audit columns: who started it, with which key, Flower's run id.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29

Adds nullable columns only, so every existing run stays readable (as unsigned). Batch mode
lets SQLite (which cannot ALTER most things) take the same migration as PostgreSQL.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("started_by", sa.String(200), nullable=True))
        batch.add_column(sa.Column("signing_key_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("flower_run_id", sa.String(32), nullable=True))
    with op.batch_alter_table("checkpoints") as batch:
        batch.add_column(sa.Column("signature", sa.LargeBinary(), nullable=True))
        batch.add_column(sa.Column("key_id", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("checkpoints") as batch:
        batch.drop_column("key_id")
        batch.drop_column("signature")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("flower_run_id")
        batch.drop_column("signing_key_id")
        batch.drop_column("started_by")
