"""`junction audit`: read and verify the hash-chained audit log of the platform store."""

from __future__ import annotations

import json

import click

from orchestration.cli.common import parse_since, render_table


@click.group()
def audit() -> None:
    """The audit log: who did what, when and from where (hash-chained, append-only)."""


@audit.command()
def verify() -> None:
    """Check the whole chain; exit 1 naming the first bad entry and why."""
    from orchestration.kernel.audit import verify_chain

    result = verify_chain()
    if result.ok:
        click.echo(f"audit chain intact: {result.entries} entries, head {result.head_hash}")
        return
    click.secho(
        f"audit chain broken at entry #{result.first_bad_id}: {result.reason} "
        f"({result.entries} entries read)",
        err=True,
        fg="red",
    )
    raise click.exceptions.Exit(1)


@audit.command(name="list")
@click.option("--actor", help="Only entries by this actor.")
@click.option("--action", help="Only entries with this action (e.g. api_key.create).")
@click.option("--target", help="Only entries about this target.")
@click.option("--since", help="Only entries from this time on: a duration ago (24h, 7d) or an ISO date-time.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True, help="At most this many.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line instead of a table.")
def list_entries(
    actor: str | None, action: str | None, target: str | None, since: str | None, limit: int, as_json: bool
) -> None:
    """Show the newest entries first."""
    from orchestration.kernel.audit import format_time, query

    since_time = parse_since(since) if since else None
    records = query(actor=actor, action=action, target=target, since=since_time, limit=limit)
    if as_json:
        for record in records:
            click.echo(json.dumps(record.to_json(), sort_keys=True))
        return
    if not records:
        click.echo("no audit entries match")
        return
    rows = [
        (
            str(record.id),
            format_time(record.time)[:19].replace("T", " "),
            record.actor,
            record.action,
            record.target,
            record.origin,
            json.dumps(record.details, sort_keys=True) if record.details else "",
        )
        for record in records
    ]
    click.echo(render_table(("ID", "TIME (UTC)", "ACTOR", "ACTION", "TARGET", "ORIGIN", "DETAILS"), rows))
