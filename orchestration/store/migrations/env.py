from alembic import context

from orchestration.store.db import create_store_engine
from orchestration.store.migrate import VERSION_TABLE
from orchestration.store.models import Base

target_metadata = Base.metadata


def run_migrations() -> None:
    url = context.config.get_main_option("sqlalchemy.url")
    engine = create_store_engine(url, one_shot=True)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            version_table=VERSION_TABLE,
            render_as_batch=connection.dialect.name == "sqlite",  # ALTER on SQLite needs batch mode
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations()
