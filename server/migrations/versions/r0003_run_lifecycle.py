"""Run lifecycle: heartbeat and end reason of a run, a `degraded` status, accepted replies per round.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29

`runs.heartbeat_at` is written every round and periodically in between, so a run whose
process died (status still "running", heartbeat old) reads as stale. `runs.reason` says why a
run failed, degraded or stopped. `rounds.num_accepted` / `rounds.degraded` mark a round with
fewer accepted replies than `min-accepted-replies`.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

OLD_STATUSES = "status IN ('running', 'completed', 'failed', 'interrupted')"
NEW_STATUSES = "status IN ('running', 'completed', 'degraded', 'failed', 'interrupted')"


def upgrade() -> None:
    # Batch mode: SQLite cannot alter a CHECK constraint in place; the table is rebuilt.
    with op.batch_alter_table("runs", recreate="auto") as batch:
        batch.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("reason", sa.Text(), nullable=True))
        batch.add_column(sa.Column("owner", sa.String(100), nullable=True))
        batch.drop_constraint("ck_runs_status", type_="check")
        batch.create_check_constraint("ck_runs_status", sa.text(NEW_STATUSES))
    with op.batch_alter_table("rounds") as batch:
        batch.add_column(sa.Column("num_accepted", sa.Integer(), nullable=True))
        batch.add_column(
            sa.Column("degraded", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("rounds") as batch:
        batch.drop_column("degraded")
        batch.drop_column("num_accepted")
    op.execute("UPDATE runs SET status = 'failed' WHERE status = 'degraded'")
    with op.batch_alter_table("runs", recreate="auto") as batch:
        batch.drop_constraint("ck_runs_status", type_="check")
        batch.create_check_constraint("ck_runs_status", sa.text(OLD_STATUSES))
        batch.drop_column("owner")
        batch.drop_column("reason")
        batch.drop_column("heartbeat_at")
