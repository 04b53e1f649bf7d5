"""Run performance time series: one row per finished Dagster run (queue wait, duration, rows, steps).

Revision ID: 0014_run_performance
Revises: 0013_alerts
Create Date: 2026-12-08
"""

import sqlalchemy as sa
from alembic import op

revision = "0014_run_performance"
down_revision = "0013_alerts"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "run_performance",
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("job", sa.String(200), nullable=False, index=True),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
        sa.Column("queued_s", sa.Float, nullable=True),
        sa.Column("duration_s", sa.Float, nullable=True),
        sa.Column("rows", sa.BigInteger, nullable=True),
        sa.Column("rows_per_s", sa.Float, nullable=True),
        sa.Column("steps", sa.JSON, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("run_performance")
