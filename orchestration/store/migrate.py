"""Alembic, driven from code: the migration scripts ship inside the package (no alembic.ini)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# Not Alembic's default `alembic_version`: dagster-postgres keeps its own migrations in that table, and
# the platform store may share a database with Dagster's storage.
VERSION_TABLE = "junction_alembic_version"


def alembic_config(url: str) -> Config:
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
    return list(ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads())


def upgrade(url: str | None = None, revision: str = "head") -> None:
    from orchestration.store.db import get_engine

    url = _url(url)
    get_engine(url)  # creates the SQLite file's folder
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str | None = None, revision: str = "base") -> None:
    command.downgrade(alembic_config(_url(url)), revision)


def current_revision(url: str | None = None) -> str | None:
    from orchestration.store.db import get_engine

    with get_engine(_url(url)).connect() as connection:
        return MigrationContext.configure(
            connection, opts={"version_table": VERSION_TABLE}
        ).get_current_revision()


def is_up_to_date(url: str | None = None) -> bool:
    return current_revision(url) in heads()
