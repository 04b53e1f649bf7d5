"""Notification dedupe: a delivery claimed under a unique key before it is sent.

A sender that may run again after a crash (the run-failure sensor, whose cursor only moves once its
tick has finished) claims the delivery first: a row in status `sending` with the unique `dedupe_key`
and the message's id, settled as `delivered` or `failed` after sending. `resends` counts the claims
found still `sending` — a send interrupted by a crash — and sent again with the same message id.

Revision ID: 0007_notification_dedupe
Revises: 0006_stream_origin
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_notification_dedupe"
down_revision = "0006_stream_origin"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("notification_deliveries") as batch:
        batch.add_column(sa.Column("dedupe_key", sa.String(400), nullable=True))
        batch.add_column(sa.Column("message_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("resends", sa.Integer, nullable=False, server_default="0"))
        batch.create_unique_constraint("uq_notification_deliveries_dedupe_key", ["dedupe_key"])


def downgrade() -> None:
    with op.batch_alter_table("notification_deliveries") as batch:
        batch.drop_constraint("uq_notification_deliveries_dedupe_key", type_="unique")
        batch.drop_column("resends")
        batch.drop_column("message_id")
        batch.drop_column("dedupe_key")
