"""Runs carry an optional client key, unique, that makes run creation idempotent.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Never rebuild `runs` on SQLite: migrations run with foreign keys on, and the DROP TABLE of a rebuild would
# cascade into every run's tags, series, points and events. Each step below is a plain ALTER or index there.


def upgrade() -> None:
    with op.batch_alter_table("runs", schema=None, recreate="never") as batch_op:
        # Existing runs have no key; NULLs never collide.
        batch_op.add_column(sa.Column("client_key", sa.String(length=200), nullable=True))
        batch_op.create_index(batch_op.f("ix_runs_client_key"), ["client_key"], unique=True)


def downgrade() -> None:
    with op.batch_alter_table("runs", schema=None, recreate="never") as batch_op:
        # SQLite's ALTER TABLE DROP COLUMN (3.35+) refuses an indexed column: the index goes first.
        batch_op.drop_index(batch_op.f("ix_runs_client_key"))
        batch_op.drop_column("client_key")
