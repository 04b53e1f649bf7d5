"""`junction events subscriptions`: the durable webhook subscriptions, their figures, and replaying
what a subscription dead-lettered.

Like every `junction events` command, it first migrates the store and syncs the streams folder; it
also syncs the subscriptions folder (JUNCTION_SUBSCRIPTIONS_DIR), so a subscription declared in YAML
is listed at once (a broken file fails the command with `file: field: reason`).
"""

from __future__ import annotations

import json

import click

from orchestration.cli.common import render_table


def open_subscriptions():
    """(the event stream, the subscriptions registry), both folders synced."""
    from orchestration.cli.events import open_stream
    from orchestration.store.db import get_engine
    from resources.event_stream.subscriptions import SubscriptionRegistry, sync_declared

    stream = open_stream()
    registry = SubscriptionRegistry(get_engine())
    try:
        sync_declared(stream, registry)
    except Exception:
        stream.close()
        raise
    return stream, registry


@click.group()
def subscriptions() -> None:
    """Durable webhook subscriptions: list them, see their groups, replay their dead letters."""


@subscriptions.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the declarations as JSON.")
def list_subscriptions(as_json: bool) -> None:
    """Every subscription with its stream, URL, owner, and its group's pending events and lag."""
    stream, registry = open_subscriptions()
    with stream:
        declared = registry.list()
        groups = {}
        for name in {s.stream for s in declared}:
            groups.update({(name, g.name): g for g in stream.stats(name).groups})
    if as_json:
        click.echo(json.dumps([s.to_json() for s in declared], indent=2))
        return
    rows = []
    for s in declared:
        group = groups.get((s.stream, s.group))
        rows.append(
            (
                s.name,
                s.stream,
                s.shown_url,
                s.origin,
                "paused" if s.spec.paused else "active",
                str(group.pending) if group else "-",
                str(group.lag) if group and group.lag is not None else "-",
            )
        )
    click.echo(render_table(("SUBSCRIPTION", "STREAM", "URL", "ORIGIN", "STATE", "PENDING", "LAG"), rows))


@subscriptions.command()
@click.argument("name")
def replay(name: str) -> None:
    """Deliver NAME's dead-lettered events again, once each, to its URL as declared now.

    Each record is replayed once: a delivery that succeeds is remembered (the dead-letter stream's
    group `replay:NAME`); one that fails is kept for the next replay. Exits 1 when any failed.
    """
    import anyio

    from resources.event_stream.subscriptions import consumer_name, replay_dead_letters

    stream, registry = open_subscriptions()
    with stream:
        subscription = registry.get(name)

        def progress(counts) -> None:
            click.echo(f"  {counts.replayed} replayed, {counts.failed} failed so far", err=True)

        counts = anyio.run(
            lambda: replay_dead_letters(stream, subscription, consumer_name(), progress=progress)
        )
    click.echo(f"subscription {name}: {counts.replayed} replayed, {counts.failed} failed")
    if counts.failed:
        raise click.ClickException(
            f"{counts.failed} event(s) could not be delivered (last: {counts.last_failure}); "
            "they stay in the dead letter for the next replay"
        )
