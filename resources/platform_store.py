"""The platform store as a Dagster resource, for ops and sensors that read or write it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import dagster as dg

if TYPE_CHECKING:
    from sqlalchemy import Engine


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
        # Imported here: the code location (and so every run worker) loads this module, and only the
        # ops that use the store need SQLAlchemy's ORM and the models.
        from orchestration.store.db import get_engine

        return get_engine(self.url)
