"""The schema as issue 4 found it (opd_grpc/storage/tables.py before migrations existed).

Revision ID: 0001
Revises:
Create Date: 2026-11-25

A revision is history: it spells out its tables and never imports tables.py, which moves on.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

ACTIVE_STATUSES = "status IN ('CONFIRMED', 'WAITLISTED', 'CHECKED_IN', 'CALLED')"


def instant(name: str, nullable: bool = False) -> sa.Column:
    """ISO-8601 UTC text with microseconds."""
    return sa.Column(name, sa.String(length=32), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "doctors",
        sa.Column("doctor_id", sa.String(length=16), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("specialization", sa.String(length=200), nullable=False),
        sa.PrimaryKeyConstraint("doctor_id"),
        sa.UniqueConstraint("number"),
    )
    op.create_table(
        "doctor_days",
        sa.Column("doctor_id", sa.String(length=16), nullable=False),
        sa.Column("date", sa.String(length=10), nullable=False),
        sa.Column("last_token_number", sa.Integer(), nullable=False),
        sa.Column("last_sequence", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["doctor_id"], ["doctors.doctor_id"]),
        sa.PrimaryKeyConstraint("doctor_id", "date"),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "slots",
        sa.Column("slot_id", sa.String(length=40), nullable=False),
        sa.Column("doctor_id", sa.String(length=16), nullable=False),
        sa.Column("date", sa.String(length=10), nullable=False),
        sa.Column("start_time", sa.String(length=5), nullable=False),
        sa.Column("end_time", sa.String(length=5), nullable=False),
        sa.Column("max_capacity", sa.Integer(), nullable=False),
        sa.Column("consultation_minutes", sa.Integer(), nullable=False),
        sa.CheckConstraint("max_capacity > 0", name="slot_capacity_positive"),
        sa.CheckConstraint("consultation_minutes > 0", name="slot_consultation_positive"),
        sa.CheckConstraint("end_time > start_time", name="slot_ends_after_start"),
        sa.PrimaryKeyConstraint("slot_id"),
        sa.UniqueConstraint("doctor_id", "date", "start_time", name="slot_start_unique"),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "tokens",
        sa.Column("token_id", sa.String(length=40), nullable=False),
        sa.Column("token_number", sa.Integer(), nullable=False),
        sa.Column("doctor_id", sa.String(length=16), nullable=False),
        sa.Column("date", sa.String(length=10), nullable=False),
        sa.Column("slot_id", sa.String(length=40), nullable=False),
        sa.Column("source", sa.String(length=20), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("patient_identity", sa.String(length=300), nullable=False),
        sa.Column("patient_name", sa.String(length=200), nullable=False),
        sa.Column("patient_phone", sa.String(length=40), nullable=False),
        sa.Column("patient_age", sa.Integer(), nullable=False),
        sa.Column("patient_gender", sa.String(length=10), nullable=False),
        sa.Column("patient_mrn", sa.String(length=64), nullable=False),
        instant("created_at"),
        instant("updated_at"),
        instant("checked_in_at", nullable=True),
        instant("called_at", nullable=True),
        instant("completed_at", nullable=True),
        sa.Column("bump_count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("token_id"),
        sa.UniqueConstraint("doctor_id", "date", "token_number", name="token_number_unique"),
        sa.ForeignKeyConstraint(["slot_id"], ["slots.slot_id"]),
        sqlite_with_rowid=False,
    )
    op.create_index("one_active_token_per_patient", "tokens", ["doctor_id", "date", "patient_identity"],
                    unique=True, sqlite_where=sa.text(ACTIVE_STATUSES), postgresql_where=sa.text(ACTIVE_STATUSES))
    op.create_table(
        "queue_events",
        sa.Column("doctor_id", sa.String(length=16), nullable=False),
        sa.Column("date", sa.String(length=10), nullable=False),
        sa.Column("sequence", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("token_id", sa.String(length=40), nullable=False),
        sa.Column("token_number", sa.Integer(), nullable=False),
        sa.Column("slot_id", sa.String(length=40), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("caused_by_token_id", sa.String(length=40), nullable=False),
        instant("occurred_at"),
        sa.PrimaryKeyConstraint("doctor_id", "date", "sequence"),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "stored_requests",
        sa.Column("request_id", sa.String(length=36), nullable=False),
        sa.Column("method", sa.String(length=40), nullable=False),
        sa.Column("fingerprint", sa.LargeBinary(), nullable=False),
        sa.Column("response", sa.LargeBinary(), nullable=False),
        instant("created_at"),
        sa.PrimaryKeyConstraint("request_id"),
    )


def downgrade() -> None:
    for table in ("stored_requests", "queue_events", "tokens", "slots", "doctor_days", "doctors"):
        op.drop_table(table)  # a table's indexes go with it
