"""Alembic, driven from code: the migration scripts ship inside the package (no alembic.ini).

Alembic is imported inside the functions: every run worker imports the store (through the code
location) but only the platform's start and `junction db` migrate, and the import costs ~0.35 s.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# Not Alembic's default `alembic_version`: dagster-postgres keeps its own migrations in that table, and
# the platform store may share a database with Dagster's storage.
VERSION_TABLE = "junction_alembic_version"


def alembic_config(url: str) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # `%` would be read as interpolation by ConfigParser (passwords may contain it).
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def _url(url: str | None) -> str:
    if url is not None:
        return url
    from orchestration.settings import get_settings

    return get_settings().store_url


def heads() -> list[str]:
    from alembic.script import ScriptDirectory

    return list(ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads())


def upgrade(url: str | None = None, revision: str = "head") -> None:
    from alembic import command

    from orchestration.store.db import get_engine

    url = _url(url)
    get_engine(url)  # creates the SQLite file's folder
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str | None = None, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(alembic_config(_url(url)), revision)


def current_revision(url: str | None = None) -> str | None:
    from alembic.runtime.migration import MigrationContext

    from orchestration.store.db import get_engine

    with get_engine(_url(url)).connect() as connection:
        return MigrationContext.configure(
            connection, opts={"version_table": VERSION_TABLE}
        ).get_current_revision()


def is_up_to_date(url: str | None = None) -> bool:
    return current_revision(url) in heads()
