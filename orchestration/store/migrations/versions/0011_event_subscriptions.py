"""Durable webhook subscriptions to event streams (`sensors/subscriptions/*.yaml` and
`PUT /gateway/v1/subscriptions/{name}`), with the lease that keeps an ordered one on one dispatcher.

Revision ID: 0011_event_subscriptions
Revises: 0010_proxy_objects
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0011_event_subscriptions"
down_revision = "0010_proxy_objects"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "event_subscriptions",
        sa.Column("name", sa.String(150), primary_key=True),
        sa.Column("stream", sa.String(200), nullable=False),
        sa.Column("spec", sa.JSON, nullable=False),
        sa.Column("origin", sa.String(300), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_holder", sa.String(200), nullable=True),
        sa.Column("lease_expires_at", sa.Float, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("event_subscriptions")
