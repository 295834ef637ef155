"""Refusals stored with their request_id (SPEC §9: the first answer, refusal or not, is the one replayed).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("stored_requests", sa.Column("refusal", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("stored_requests") as table:  # SQLite drops a column by copying the table
        table.drop_column("refusal")
