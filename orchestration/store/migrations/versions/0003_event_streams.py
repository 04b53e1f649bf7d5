"""Event streams: the streams registry and the SQL backend's events, heads, idempotency keys and groups.

Revision ID: 0003_event_streams
Revises: 0002_api_request_stats
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_event_streams"
down_revision = "0002_api_request_stats"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "event_streams",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("payload_schema", sa.JSON, nullable=True),
        sa.Column("retention_max_count", sa.BigInteger, nullable=True),
        sa.Column("retention_max_age_seconds", sa.BigInteger, nullable=True),
        sa.Column("idempotency_window_seconds", sa.BigInteger, nullable=False),
        sa.Column("origin", sa.String(20), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "stream_heads",
        sa.Column("stream", sa.String(200), primary_key=True),
        sa.Column("last_ms", sa.BigInteger, nullable=False),
        sa.Column("last_seq", sa.BigInteger, nullable=False),
        sa.Column("max_deleted_ms", sa.BigInteger, nullable=False),
        sa.Column("max_deleted_seq", sa.BigInteger, nullable=False),
        sa.Column("events_added", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "stream_events",
        sa.Column("stream", sa.String(200), primary_key=True),
        sa.Column("ms", sa.BigInteger, primary_key=True),
        sa.Column("seq", sa.BigInteger, primary_key=True),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("idempotency_key", sa.String(200), nullable=True),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "stream_idempotency_keys",
        sa.Column("stream", sa.String(200), primary_key=True),
        sa.Column("key", sa.String(200), primary_key=True),
        sa.Column("event_ms", sa.BigInteger, nullable=False),
        sa.Column("event_seq", sa.BigInteger, nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_stream_idempotency_keys_expires_at", "stream_idempotency_keys", ["expires_at"])
    op.create_table(
        "stream_consumer_groups",
        sa.Column("stream", sa.String(200), primary_key=True),
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("last_delivered_ms", sa.BigInteger, nullable=False),
        sa.Column("last_delivered_seq", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "stream_pending_events",
        sa.Column("stream", sa.String(200), primary_key=True),
        sa.Column("group_name", sa.String(200), primary_key=True),
        sa.Column("ms", sa.BigInteger, primary_key=True),
        sa.Column("seq", sa.BigInteger, primary_key=True),
        sa.Column("consumer", sa.String(200), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deliveries", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    for table in (
        "stream_pending_events",
        "stream_consumer_groups",
        "stream_idempotency_keys",
        "stream_events",
        "stream_heads",
        "event_streams",
    ):
        op.drop_table(table)
