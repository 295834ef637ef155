"""Weekly patterns of slots (slot templates) and holidays, which ApplySlotTemplate expands into slots.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "slot_templates",
        sa.Column("doctor_id", sa.String(length=16), nullable=False),
        sa.Column("weekday", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("start_time", sa.String(length=5), nullable=False),
        sa.Column("end_time", sa.String(length=5), nullable=False),
        sa.Column("max_capacity", sa.Integer(), nullable=True),
        sa.Column("consultation_minutes", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("doctor_id", "weekday", "start_time"),
        sa.CheckConstraint("weekday BETWEEN 1 AND 7", name="template_weekday_iso"),
        sa.CheckConstraint("end_time > start_time", name="template_ends_after_start"),
        sa.CheckConstraint("max_capacity > 0", name="template_capacity_positive"),
        sa.CheckConstraint("consultation_minutes > 0", name="template_consultation_positive"),
        sa.ForeignKeyConstraint(["doctor_id"], ["doctors.doctor_id"]),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "holidays",
        sa.Column("date", sa.String(length=10), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.PrimaryKeyConstraint("date"),
        sqlite_with_rowid=False,
    )


def downgrade() -> None:
    op.drop_table("holidays")
    op.drop_table("slot_templates")
