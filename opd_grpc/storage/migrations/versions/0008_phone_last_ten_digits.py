"""A phone is compared by its last 10 digits (engine/model.py, PHONE_DIGITS_COMPARED): +91 98765 43210 and
098765 43210 are 98765 43210. The identity of each active token booked without an mrn is written again that way,
so that the schema's one-active-token-per-patient index holds what the engine holds. Where one patient already
holds two active tokens of one doctor-day under two forms of a phone, a token whose new identity the other already
holds keeps its own (the index would refuse the change): the desk cancels one.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

DIGITS_COMPARED = 10  # as this revision wrote them, whatever the engine's constant becomes
ACTIVE = ("CONFIRMED", "WAITLISTED", "CHECKED_IN", "CALLED")
tokens = sa.table("tokens", sa.column("token_id", sa.String), sa.column("doctor_id", sa.String),
                  sa.column("date", sa.String), sa.column("patient_identity", sa.String),
                  sa.column("status", sa.String))


def shortened(identity: str) -> str:
    """phone:<digits>:<folded name> with the digits' last DIGITS_COMPARED (the name may hold colons itself)."""
    _, digits, name = identity.split(":", 2)
    return f"phone:{digits[-DIGITS_COMPARED:]}:{name}"


def upgrade() -> None:
    conn = op.get_bind()
    active = conn.execute(sa.select(tokens.c.token_id, tokens.c.doctor_id, tokens.c.date, tokens.c.patient_identity)
                          .where(tokens.c.status.in_(ACTIVE))).all()
    held = {(row.doctor_id, row.date, row.patient_identity) for row in active}
    for row in active:
        if not row.patient_identity.startswith("phone:"):
            continue
        new = shortened(row.patient_identity)
        if new != row.patient_identity and (row.doctor_id, row.date, new) not in held:
            conn.execute(sa.update(tokens).where(tokens.c.token_id == row.token_id).values(patient_identity=new))
            held.add((row.doctor_id, row.date, new))


def downgrade() -> None:
    """Nothing to undo: an older server compares the phones it reads from the rows, and its index takes these."""
