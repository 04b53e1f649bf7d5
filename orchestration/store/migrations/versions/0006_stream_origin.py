"""Stream ownership: a stream's origin names its owner, `api` or `yaml:<file>` (the file of the streams
folder declaring it), so the YAML sync and `PUT /gateway/v1/streams/{name}` never overwrite each
other's streams. The column grows to hold a file name; rows synced before this revision say `yaml`
(no file) and gain their file at the next sync.

Revision ID: 0006_stream_origin
Revises: 0005_workflow_sync
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_stream_origin"
down_revision = "0005_workflow_sync"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("event_streams") as batch:
        batch.alter_column(
            "origin", type_=sa.String(300), existing_type=sa.String(20), existing_nullable=False
        )


def downgrade() -> None:
    # The file names do not fit the old column: back to the owner kinds it held.
    op.execute("UPDATE event_streams SET origin = 'yaml' WHERE origin LIKE 'yaml:%'")
    with op.batch_alter_table("event_streams") as batch:
        batch.alter_column(
            "origin", type_=sa.String(20), existing_type=sa.String(300), existing_nullable=False
        )
