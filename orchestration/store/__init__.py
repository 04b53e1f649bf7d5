"""The platform store: what Dagster does not store (audit log, API keys, deliveries, ...).

Dagster's run and event storage is the record of pipeline and workflow executions; nothing here
duplicates it. Each feature adds its tables with its own Alembic migration in `migrations/versions`.
"""

from orchestration.store.db import get_engine, session_scope
from orchestration.store.migrate import current_revision, downgrade, heads, upgrade

__all__ = ["current_revision", "downgrade", "get_engine", "heads", "session_scope", "upgrade"]
