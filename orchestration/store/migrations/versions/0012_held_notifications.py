"""Messages held by a throttled or digesting notification channel until their digest goes out.

Revision ID: 0012_held_notifications
Revises: 0011_event_subscriptions
Create Date: 2026-12-08
"""

import sqlalchemy as sa
from alembic import op

revision = "0012_held_notifications"
down_revision = "0011_event_subscriptions"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "notification_held",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("channel", sa.String(200), nullable=False, index=True),
        sa.Column("delivery_id", sa.Integer, nullable=False),
        sa.Column("reason", sa.String(20), nullable=False),
        sa.Column("message", sa.JSON, nullable=False),
        sa.Column("held_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("digest_key", sa.String(400), nullable=True, index=True),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("released_at", sa.DateTime(timezone=True), nullable=True, index=True),
    )


def downgrade() -> None:
    op.drop_table("notification_held")
