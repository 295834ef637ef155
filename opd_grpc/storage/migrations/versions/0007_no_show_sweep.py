"""AUTO_NO_SHOW keeps how far it has got, so that a restarted server does not look through every past day again.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    sweep = op.create_table(
        "no_show_sweep",
        sa.Column("sweep_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("swept_to", sa.String(length=10), nullable=True),
        sa.PrimaryKeyConstraint("sweep_id"),
        sa.CheckConstraint("sweep_id = 1", name="no_show_sweep_one_row"),
    )
    op.bulk_insert(sweep, [{"sweep_id": 1, "swept_to": None}])


def downgrade() -> None:
    op.drop_table("no_show_sweep")
