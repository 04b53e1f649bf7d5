"""Alert state (`sensors/alerts/`): alerts of each rule, their groups' notification state, silences.

Revision ID: 0013_alerts
Revises: 0012_held_notifications
Create Date: 2026-12-08
"""

import sqlalchemy as sa
from alembic import op

revision = "0013_alerts"
down_revision = "0012_held_notifications"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "system_alerts",
        sa.Column("fingerprint", sa.String(64), primary_key=True),
        sa.Column("rule", sa.String(200), nullable=False, index=True),
        sa.Column("labels", sa.JSON, nullable=False),
        sa.Column("severity", sa.String(20), nullable=False),
        sa.Column("status", sa.String(20), nullable=False, index=True),
        sa.Column("value", sa.Float, nullable=True),
        sa.Column("summary", sa.Text, nullable=False),
        sa.Column("active_since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("fired_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True, index=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("muted_by", sa.String(100), nullable=True),
        sa.Column("group_key", sa.String(64), nullable=False, index=True),
    )
    op.create_table(
        "alert_groups",
        sa.Column("group_key", sa.String(64), primary_key=True),
        sa.Column("rule", sa.String(200), nullable=False, index=True),
        sa.Column("labels", sa.JSON, nullable=False),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_notified_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("notified", sa.JSON, nullable=False),
        sa.Column("sequence", sa.Integer, nullable=False),
    )
    op.create_table(
        "alert_silences",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("matchers", sa.JSON, nullable=False),
        sa.Column("starts_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ends_at", sa.DateTime(timezone=True), nullable=False, index=True),
        sa.Column("comment", sa.Text, nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("alert_silences")
    op.drop_table("alert_groups")
    op.drop_table("system_alerts")
