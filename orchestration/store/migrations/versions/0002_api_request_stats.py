"""Gateway API request statistics, one row per minute, route, method, key and gateway instance.

Revision ID: 0002_api_request_stats
Revises: 0001_platform_store
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_api_request_stats"
down_revision = "0001_platform_store"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_request_stats",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("minute", sa.DateTime(timezone=True), nullable=False),
        sa.Column("instance", sa.String(200), nullable=False),
        sa.Column("route", sa.String(500), nullable=False),
        sa.Column("method", sa.String(10), nullable=False),
        sa.Column("principal", sa.String(200), nullable=False),
        sa.Column("requests", sa.Integer, nullable=False),
        sa.Column("status_2xx", sa.Integer, nullable=False),
        sa.Column("status_3xx", sa.Integer, nullable=False),
        sa.Column("status_4xx", sa.Integer, nullable=False),
        sa.Column("status_5xx", sa.Integer, nullable=False),
        sa.Column("latency_sum_ms", sa.Float, nullable=False),
        sa.Column("latency_p50_ms", sa.Float, nullable=False),
        sa.Column("latency_p95_ms", sa.Float, nullable=False),
        sa.Column("latency_p99_ms", sa.Float, nullable=False),
        sa.UniqueConstraint(
            "minute", "instance", "route", "method", "principal", name="uq_api_request_stats_bucket"
        ),
    )
    op.create_index("ix_api_request_stats_minute", "api_request_stats", ["minute"])


def downgrade() -> None:
    op.drop_table("api_request_stats")
