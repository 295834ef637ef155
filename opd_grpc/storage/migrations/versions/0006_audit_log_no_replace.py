"""The audit log refuses SQLite's INSERT OR REPLACE of a row it holds, which deletes that row without firing the
DELETE trigger of 0004.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# As tables.AUDIT_NO_REPLACE says it today; a revision keeps its own copy, for tables.py may change later.
NO_REPLACE = ("CREATE TRIGGER audit_log_no_replace BEFORE INSERT ON audit_log "
              "WHEN EXISTS (SELECT 1 FROM audit_log WHERE entry_id = NEW.entry_id) "
              "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END")


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute(NO_REPLACE)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER audit_log_no_replace")
