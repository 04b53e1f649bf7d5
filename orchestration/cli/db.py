"""`junction db`: the platform store's migrations."""

from __future__ import annotations

import click


@click.group()
def db() -> None:
    """The platform store (SQLite at $JUNCTION_HOME/platform.db, or JUNCTION_DATABASE_URL)."""


@db.command()
@click.option("--revision", default="head", show_default=True, help="Target revision.")
def upgrade(revision: str) -> None:
    """Apply migrations up to REVISION."""
    from orchestration.store.bootstrap import migrate_store

    revision_now = migrate_store(revision=revision)
    click.echo(f"platform store at revision {revision_now}")


@db.command()
@click.option("--revision", required=True, help="Target revision ('base' removes every table).")
@click.confirmation_option(prompt="Downgrading drops tables and their data. Continue?")
def downgrade(revision: str) -> None:
    """Revert migrations down to REVISION."""
    from orchestration.store import current_revision
    from orchestration.store import downgrade as run_downgrade

    run_downgrade(revision=revision)
    click.echo(f"platform store at revision {current_revision() or 'base'}")


@db.command()
def current() -> None:
    """Print the store's current revision and the code's head."""
    from orchestration.store import current_revision, heads

    click.echo(f"current: {current_revision() or 'base'}\nhead:    {', '.join(heads())}")
