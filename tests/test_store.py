"""The platform store's migrations on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from orchestration.store import current_revision, downgrade, get_engine, heads, upgrade
from orchestration.store.migrate import VERSION_TABLE
from orchestration.store.models import Base


def test_alembic_has_exactly_one_head():
    assert len(heads()) == 1, f"several Alembic heads, merge them: {heads()}"


@pytest.fixture(params=["sqlite", "postgres"])
def empty_store_url(request, junction_home):
    if request.param == "sqlite":
        return f"sqlite:///{junction_home / 'platform.db'}"
    return request.getfixturevalue("clean_postgres_url")


def test_up_down_up(empty_store_url: str):
    upgrade(empty_store_url)
    assert current_revision(empty_store_url) == heads()[0]
    tables = set(inspect(get_engine(empty_store_url)).get_table_names())
    assert {"audit_log", "api_keys", "notification_deliveries", VERSION_TABLE} <= tables
    assert "alembic_version" not in tables, "Dagster's own migrations use alembic_version"

    downgrade(empty_store_url, "base")
    assert current_revision(empty_store_url) is None
    assert set(inspect(get_engine(empty_store_url)).get_table_names()) <= {VERSION_TABLE}

    upgrade(empty_store_url)
    assert current_revision(empty_store_url) == heads()[0]


def test_models_match_the_migrations(store_url: str):
    """Autogenerate finds nothing to do: the models and the migrations describe the same schema."""
    with get_engine(store_url).connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        differences = compare_metadata(context, Base.metadata)
    assert differences == []


def test_unreachable_store_is_a_clear_error():
    from orchestration.errors import ConfigurationError
    from orchestration.store.bootstrap import migrate_store

    with pytest.raises(
        ConfigurationError, match=r"platform store postgresql://junction:\*\*\*@127.0.0.1:1/x is unreachable"
    ):
        migrate_store("postgresql://junction:secret@127.0.0.1:1/x")


def test_stream_origins_name_their_file_and_go_back_to_their_kind(empty_store_url: str):
    """0006 widens `event_streams.origin` for `yaml:<file>`; its downgrade keeps the owner's kind."""
    from sqlalchemy import text

    upgrade(empty_store_url)
    engine = get_engine(empty_store_url)
    origin = "yaml:" + "a-long-file-name-" * 10 + ".yaml"
    with engine.begin() as connection:
        for name, value in (("clicks", origin), ("payments", "api")):
            connection.execute(
                text(
                    "INSERT INTO event_streams (name, description, idempotency_window_seconds, origin, "
                    "created_at, updated_at) VALUES (:name, '', 60, :origin, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                ),
                {"name": name, "origin": value},
            )
    downgrade(empty_store_url, "0005_workflow_sync")
    with engine.connect() as connection:
        rows = dict(connection.execute(text("SELECT name, origin FROM event_streams")).all())
    assert rows == {"clicks": "yaml", "payments": "api"}
    upgrade(empty_store_url)
