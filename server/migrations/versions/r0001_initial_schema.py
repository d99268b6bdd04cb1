"""Initial run-store schema: runs, rounds, client_results, consensus_masks, checkpoints, events.

Revision ID: 0001
Revises:
Create Date: 2025-01-01

Written by hand (not imported from models.py) so later model edits never change what this
revision does; tests/server/test_store.py checks models and migrations agree.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def _run_id(table: str) -> sa.Column[str]:
    return sa.Column(
        "run_id",
        sa.String(32),
        sa.ForeignKey("runs.id", name=f"fk_{table}_run_id_runs", ondelete="CASCADE"),
        nullable=False,
    )


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=True),
        sa.Column("code_version", sa.String(100), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_round", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_runs"),
        sa.CheckConstraint(
            "status IN ('running', 'completed', 'failed', 'interrupted')",
            name="ck_runs_status",
        ),
    )
    op.create_table(
        "rounds",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        _run_id("rounds"),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("train_loss", sa.Float(), nullable=True),
        sa.Column("accuracy", sa.Float(), nullable=True),
        sa.Column("upload_bytes", sa.BigInteger(), nullable=False),
        sa.Column("download_bytes", sa.BigInteger(), nullable=False),
        sa.Column("wall_s", sa.Float(), nullable=False),
        sa.Column("density", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_rounds"),
        sa.UniqueConstraint("run_id", "round", name="uq_rounds_run_id_round"),
    )
    op.create_table(
        "client_results",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        _run_id("client_results"),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.String(32), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("upload_bytes", sa.BigInteger(), nullable=False),
        sa.Column("download_bytes", sa.BigInteger(), nullable=False),
        sa.Column("accepted", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_client_results"),
    )
    op.create_index("ix_client_results_run_id_round", "client_results", ["run_id", "round"])
    op.create_table(
        "consensus_masks",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        _run_id("consensus_masks"),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("blob", sa.LargeBinary(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("layer_densities", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_consensus_masks"),
        sa.UniqueConstraint("run_id", "round", name="uq_consensus_masks_run_id_round"),
    )
    op.create_table(
        "checkpoints",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        _run_id("checkpoints"),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("blob", sa.LargeBinary(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_checkpoints"),
        sa.UniqueConstraint("run_id", "round", name="uq_checkpoints_run_id_round"),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        _run_id("events"),
        sa.Column("round", sa.Integer(), nullable=True),
        sa.Column("node_id", sa.String(32), nullable=True),
        sa.Column("kind", sa.String(50), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_events"),
    )
    op.create_index("ix_events_run_id_round", "events", ["run_id", "round"])


def downgrade() -> None:
    for index, table in (
        ("ix_events_run_id_round", "events"),
        ("ix_client_results_run_id_round", "client_results"),
    ):
        op.drop_index(index, table_name=table)
    for table in ("events", "checkpoints", "consensus_masks", "client_results", "rounds", "runs"):
        op.drop_table(table)
