"""Workflow sync: what a parked execution waits on besides time (the Sync step's child run).

Revision ID: 0005_workflow_sync
Revises: 0004_workflow_parking
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_workflow_sync"
down_revision = "0004_workflow_parking"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("workflow_checkpoints") as batch:
        batch.add_column(sa.Column("waiting_on_run_id", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workflow_checkpoints") as batch:
        batch.drop_column("waiting_on_run_id")
