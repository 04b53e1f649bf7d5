"""Workflow parking: execution checkpoints, approval requests and their decisions.

Revision ID: 0004_workflow_parking
Revises: 0003_event_streams
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_workflow_parking"
down_revision = "0003_event_streams"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "workflow_checkpoints",
        sa.Column("execution_id", sa.String(64), primary_key=True),
        sa.Column("workflow", sa.String(200), nullable=False),
        sa.Column("inputs", sa.JSON, nullable=False),
        sa.Column("step_outputs", sa.JSON, nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("parked_step", sa.String(200), nullable=True),
        sa.Column("parked_run_id", sa.String(64), nullable=True),
        sa.Column("wake_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_workflow_checkpoints_workflow", "workflow_checkpoints", ["workflow"])
    op.create_index("ix_workflow_checkpoints_state", "workflow_checkpoints", ["state"])
    op.create_index("ix_workflow_checkpoints_wake_at", "workflow_checkpoints", ["wake_at"])
    op.create_table(
        "approval_requests",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("execution_id", sa.String(64), nullable=False),
        sa.Column("workflow", sa.String(200), nullable=False),
        sa.Column("step_id", sa.String(200), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("approver_principals", sa.JSON, nullable=False),
        sa.Column("approver_groups", sa.JSON, nullable=False),
        sa.Column("required_approvals", sa.Integer, nullable=False),
        sa.Column("timeout_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("on_timeout", sa.String(10), nullable=False),
        sa.Column("form_inputs", sa.JSON, nullable=False),
        sa.Column("forbid_self_approval", sa.Boolean, nullable=False),
        sa.Column("requester", sa.String(200), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("resolution", sa.String(20), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("execution_id", "step_id", name="uq_approval_requests_step"),
    )
    op.create_index("ix_approval_requests_execution_id", "approval_requests", ["execution_id"])
    op.create_index("ix_approval_requests_status", "approval_requests", ["status"])
    op.create_table(
        "approval_decisions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "request_id",
            sa.String(32),
            sa.ForeignKey("approval_requests.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("principal", sa.String(200), nullable=False),
        sa.Column("decision", sa.String(10), nullable=False),
        sa.Column("comment", sa.Text, nullable=False),
        sa.Column("inputs", sa.JSON, nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("request_id", "principal", name="uq_approval_decisions_principal"),
    )
    op.create_index("ix_approval_decisions_request_id", "approval_decisions", ["request_id"])


def downgrade() -> None:
    for table in ("approval_decisions", "approval_requests", "workflow_checkpoints"):
        op.drop_table(table)
