"""The reverse proxy's routes and upstreams declared through the admin API (`/gateway/v1/routes`,
`/gateway/v1/upstreams`); those of the routes file stay in the file.

Revision ID: 0010_proxy_objects
Revises: 0009_cache_operations
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0010_proxy_objects"
down_revision = "0009_cache_operations"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "proxy_objects",
        sa.Column("kind", sa.String(20), primary_key=True),
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("spec", sa.JSON, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("updated_by", sa.String(200), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("proxy_objects")
