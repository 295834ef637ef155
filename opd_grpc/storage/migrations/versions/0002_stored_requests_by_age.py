"""An index of stored requests by age, so that pruning them (REQUEST_RETENTION_HOURS) reads only the old ones.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("stored_requests_by_age", "stored_requests", ["created_at"])


def downgrade() -> None:
    op.drop_index("stored_requests_by_age", table_name="stored_requests")
