from alembic import context
from sqlalchemy import text

from orchestration.store.db import create_store_engine
from orchestration.store.migrate import VERSION_TABLE
from orchestration.store.models import Base

target_metadata = Base.metadata
# Several processes may start on one store at once (gateways behind a load balancer, `--workers N`):
# one migrates while the others wait, then find the store at head. PostgreSQL: an advisory lock held
# by the migration's transaction; SQLite: the write lock, taken at BEGIN.
MIGRATION_LOCK_ID = 0x6A756E6374696F6E  # "junction"


def run_migrations() -> None:
    url = context.config.get_main_option("sqlalchemy.url")
    engine = create_store_engine(url, one_shot=True)
    with engine.connect() as connection:
        if connection.dialect.name == "sqlite":
            connection = connection.execution_options(sqlite_begin="IMMEDIATE")
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            version_table=VERSION_TABLE,
            render_as_batch=connection.dialect.name == "sqlite",  # ALTER on SQLite needs batch mode
        )
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID})
            context.run_migrations()
    engine.dispose()


run_migrations()
