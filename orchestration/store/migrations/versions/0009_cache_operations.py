"""The cache's operations: leases (one write-behind flusher per namespace), sampled key hits (what to
warm) and each process's figures (analytics across processes).

Revision ID: 0009_cache_operations
Revises: 0008_cache_entries
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0009_cache_operations"
down_revision = "0008_cache_entries"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cache_leases",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("holder", sa.String(100), nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
    )
    op.create_table(
        "cache_key_hits",
        sa.Column("namespace", sa.String(100), primary_key=True),
        sa.Column("key", sa.String(500), primary_key=True),
        sa.Column("hits", sa.BigInteger, nullable=False),
        sa.Column("last_hit_at", sa.Float, nullable=False),
    )
    op.create_index("ix_cache_key_hits_namespace_hits", "cache_key_hits", ["namespace", "hits"])
    op.create_table(
        "cache_process_stats",
        sa.Column("process_id", sa.String(64), primary_key=True),
        sa.Column("namespace", sa.String(100), primary_key=True),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False, index=True),
        sa.Column("figures", sa.JSON, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("cache_process_stats")
    op.drop_index("ix_cache_key_hits_namespace_hits", table_name="cache_key_hits")
    op.drop_table("cache_key_hits")
    op.drop_table("cache_leases")
