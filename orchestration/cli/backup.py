"""`junction backup`: archive and restore the embedded platform (SQLite store and Dagster's storage)."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def backup() -> None:
    """Back up and restore the embedded default (SQLite). A PostgreSQL store is backed up with pg_dump."""


@backup.command()
@click.option(
    "--output",
    type=click.Path(path_type=Path),
    help="Archive file or folder. Default: $JUNCTION_HOME/backups/junction-backup-<time>.tar.gz.",
)
@click.option(
    "--require-dagster",
    is_flag=True,
    help="Fail instead of backing up the store alone when the platform runs (Dagster's storage is "
    "only backed up while it is stopped).",
)
def create(output: Path | None, require_dagster: bool) -> None:
    """Write a .tar.gz of the platform store (online copy) and, while the platform is stopped, Dagster's storage."""
    from orchestration.kernel.backup import create_backup

    click.echo("backing up:")
    result = create_backup(output, require_dagster=require_dagster, progress=click.echo)
    if not result.dagster_included:
        click.secho(
            f"Dagster's storage was NOT backed up: {result.dagster_skipped_reason}", err=True, fg="yellow"
        )
    total = sum(file.size for file in result.files)
    count = f"{len(result.files)} file" + ("" if len(result.files) == 1 else "s")
    click.echo(f"wrote {result.archive} ({count}, {total:,} bytes before compression)")


@backup.command()
@click.argument("archive", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option(
    "--force",
    is_flag=True,
    help="Replace the current store and Dagster storage (needed whenever they exist).",
)
def restore(archive: Path, force: bool) -> None:
    """Restore ARCHIVE (platform stopped): checksums are verified before anything is replaced."""
    from orchestration.kernel.backup import restore_backup

    result = restore_backup(archive, force=force, progress=click.echo)
    restored = "the platform store and Dagster's storage" if result.dagster_restored else "the platform store"
    click.echo(f"restored {restored} from {result.archive} (store at revision {result.alembic_revision})")
    if not result.dagster_restored:
        click.secho("the archive holds no Dagster storage: Dagster's storage was left as it was", err=True)
