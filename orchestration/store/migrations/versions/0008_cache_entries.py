"""The cache's database layer: encoded values with their fresh and expiry times, and their tags.

Revision ID: 0008_cache_entries
Revises: 0007_notification_dedupe
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0008_cache_entries"
down_revision = "0007_notification_dedupe"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cache_entries",
        sa.Column("namespace", sa.String(100), primary_key=True),
        sa.Column("key", sa.String(500), primary_key=True),
        sa.Column("value", sa.LargeBinary, nullable=False),
        sa.Column("fresh_until", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("tags", sa.JSON, nullable=False),
    )
    op.create_index("ix_cache_entries_expires_at", "cache_entries", ["expires_at"])
    op.create_table(
        "cache_entry_tags",
        sa.Column("namespace", sa.String(100), primary_key=True),
        sa.Column("tag", sa.String(200), primary_key=True),
        sa.Column("key", sa.String(500), primary_key=True),
    )


def downgrade() -> None:
    op.drop_table("cache_entry_tags")
    op.drop_index("ix_cache_entries_expires_at", table_name="cache_entries")
    op.drop_table("cache_entries")
