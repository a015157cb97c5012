"""Live detection: run mode and detector, detector state, decision history, the live feed.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        # Runs created before live detection existed are only observed, by no detector.
        batch_op.add_column(sa.Column("mode", sa.String(length=16), nullable=False, server_default="observe"))
        batch_op.add_column(sa.Column("detector", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("auto_approve_after_s", sa.Double(), nullable=True))
        batch_op.add_column(sa.Column("reject_backoff", sa.JSON(), nullable=True))
    with op.batch_alter_table("decisions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("history", sa.JSON(), nullable=False, server_default="[]"))
        batch_op.add_column(sa.Column("overridden", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.create_table(
        "detector_states",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("state", sa.JSON(), nullable=False),
        sa.Column("last_step", sa.BigInteger(), nullable=True),
        sa.Column("lr", sa.Double(), nullable=True),
        sa.Column("lr_step", sa.BigInteger(), nullable=True),
        sa.Column("hold_until_step", sa.BigInteger(), nullable=True),
        sa.Column("hold_until_epoch", sa.Double(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_detector_states_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_detector_states")),
    )
    op.create_table(
        "feed_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_feed_events_run_id_runs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_feed_events")),
    )
    op.create_index("ix_feed_events_run_id_id", "feed_events", ["run_id", "id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_feed_events_run_id_id", table_name="feed_events")
    op.drop_table("feed_events")
    op.drop_table("detector_states")
    with op.batch_alter_table("decisions", schema=None) as batch_op:
        batch_op.drop_column("overridden")
        batch_op.drop_column("history")
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("reject_backoff")
        batch_op.drop_column("auto_approve_after_s")
        batch_op.drop_column("detector")
        batch_op.drop_column("mode")
