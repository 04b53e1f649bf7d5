"""The platform store as a Dagster resource, for ops and sensors that read or write it."""

from __future__ import annotations

import dagster as dg
from sqlalchemy import Engine

from orchestration.store.db import get_engine


class PlatformStoreResource(dg.ConfigurableResource):
    """Junction's platform store (audit log, API keys, deliveries...).

    `database_url` unset means the platform's own setting (JUNCTION_DATABASE_URL, else the embedded
    SQLite file); set it with `dg.EnvVar(...)` when a deployment keeps the URL elsewhere.
    """

    database_url: str | None = None

    @property
    def url(self) -> str:
        from orchestration.settings import get_settings

        return self.database_url or get_settings().store_url

    def engine(self) -> Engine:
        return get_engine(self.url)
