"""Command channel on decisions: why, when delivered and acknowledged, and the step and LR of application.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("decisions", schema=None) as batch_op:
        # Existing rows get an empty reason; new rows always set one.
        batch_op.add_column(sa.Column("reason", sa.Text(), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("applied_step", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("applied_lr", sa.Double(), nullable=True))
        batch_op.add_column(sa.Column("ack_message", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("acked_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("decisions", schema=None) as batch_op:
        batch_op.drop_column("acked_at")
        batch_op.drop_column("delivered_at")
        batch_op.drop_column("ack_message")
        batch_op.drop_column("applied_lr")
        batch_op.drop_column("applied_step")
        batch_op.drop_column("reason")
