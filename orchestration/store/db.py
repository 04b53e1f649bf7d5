"""Engines and sessions for the platform store (SQLite embedded, PostgreSQL in production)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection, _record):  # pragma: no cover - exercised through every SQLite test
        # pysqlite's own transaction handling would defer BEGIN; we issue BEGIN ourselves (below)
        # so that writers can take the write lock up front with BEGIN IMMEDIATE where they need to.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection):  # pragma: no cover - exercised through every SQLite test
        mode = connection.get_execution_options().get("sqlite_begin", "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")


def create_store_engine(url: str, *, one_shot: bool = False) -> Engine:
    """A new engine for `url`; SQLite files get WAL, foreign keys and a busy timeout.

    `one_shot` engines keep no pooled connection (migrations, CLI commands that exit).
    """
    parsed = make_url(url)
    pooling = {"poolclass": NullPool} if one_shot else {}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, connect_args={"timeout": 30}, **pooling)
        _configure_sqlite(engine)
        return engine
    if not one_shot:
        pooling = {"pool_pre_ping": True, "pool_size": 5, "max_overflow": 10}
    return create_engine(parsed, **pooling)


def get_engine(url: str | None = None) -> Engine:
    """The process-wide engine for `url` (default: the settings' platform store)."""
    if url is None:
        from orchestration.settings import get_settings

        url = get_settings().store_url
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = create_store_engine(url)
        return engine


def dispose_engines() -> None:
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


@contextmanager
def session_scope(engine: Engine | None = None, *, write_lock: bool = False) -> Iterator[Session]:
    """A session in one transaction, committed on success and rolled back on error.

    `write_lock=True` takes SQLite's write lock at BEGIN (BEGIN IMMEDIATE), for read-then-write
    sequences that must not interleave with another writer; PostgreSQL callers lock rows instead.
    """
    engine = engine or get_engine()
    if write_lock and engine.dialect.name == "sqlite":
        engine = engine.execution_options(sqlite_begin="IMMEDIATE")
    factory = sessionmaker(bind=engine, expire_on_commit=False)
    with factory() as session, session.begin():
        yield session


def upsertable_insert(engine: Engine, model: Any) -> Any:
    """`INSERT` for `model` in the engine's dialect, which offers `on_conflict_do_nothing/update`
    (both SQLite and PostgreSQL spell an upsert `ON CONFLICT`)."""
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(model)
