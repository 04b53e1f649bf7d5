"""`junction alerts`: the alert state, the rules, sending a rule's message to try its channels, and
silences (created and expired here are audited, as through the API)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import click

from orchestration.cli.common import render_table


@click.group()
def alerts() -> None:
    """Alert rules (resources/alerts.yaml), the alerts they hold, and silences."""


@alerts.command("list")
@click.option(
    "--status", type=click.Choice(["pending", "firing", "resolved"]), help="Only alerts in this state."
)
@click.option("--json", "as_json", is_flag=True, help="Print the alerts as JSON.")
def list_alerts(status: str | None, as_json: bool) -> None:
    """The alerts the rules hold now, firing first (resolved ones for 24 h)."""
    from orchestration.store.bootstrap import migrate_store
    from sensors.alerts.evaluation import current_alerts

    migrate_store()
    found = [alert for alert in current_alerts() if status is None or alert["status"] == status]
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    if not found:
        click.echo("no alerts")
        return
    rows = [
        (
            alert["status"] + (" (muted)" if alert["muted_by"] else ""),
            alert["severity"],
            alert["rule"],
            alert["active_since"][:19],
            alert["summary"],
        )
        for alert in found
    ]
    click.echo(render_table(("STATUS", "SEVERITY", "RULE", "SINCE", "SUMMARY"), rows))


@alerts.command("rules")
def list_rules() -> None:
    """The declared rules: signal, severity, channels and grouping (a bad file fails with every problem)."""
    from sensors.alerts.rules import load_alert_rules

    rules = load_alert_rules()
    if not rules.rules:
        click.echo(f"no rules in {rules.path}")
        return
    rows = [
        (
            rule.name,
            rule.signal.kind,
            rule.spec.severity,
            ", ".join(rule.spec.channels),
            ", ".join(rule.timing.group_by),
            f"{rule.timing.group_wait}/{rule.timing.group_interval}/{rule.timing.repeat_interval}",
        )
        for rule in rules.rules.values()
    ]
    click.echo(
        render_table(("RULE", "SIGNAL", "SEVERITY", "CHANNELS", "GROUP BY", "WAIT/INTERVAL/REPEAT"), rows)
    )


@alerts.command("test")
@click.argument("rule")
def test_rule(rule: str) -> None:
    """Render RULE's notification as if it fired now and send it to its channels.

    The message says it is a test; alert state is not touched, and each send leaves its delivery
    record. Exits 1 when a channel fails.
    """
    from orchestration.store.bootstrap import migrate_store
    from resources.notifications import NotificationError, send
    from sensors.alerts.evaluation import GroupNotification, group_message
    from sensors.alerts.rules import load_alert_rules

    migrate_store()
    rules = load_alert_rules()
    if rule not in rules.rules:
        known = ", ".join(sorted(rules.rules)) or "none"
        raise click.BadParameter(f"no rule {rule!r} (declared: {known})", param_hint="RULE")
    chosen = rules.rules[rule]
    labels = {name: chosen.labels.get(name, "") for name in chosen.timing.group_by}
    due = GroupNotification(
        chosen,
        f"test-{rule}",
        labels,
        0,
        [("test", f"TEST of rule {rule}: a notification as it would be sent")],
        [],
        False,
    )
    message = group_message(due)
    failed = 0
    for channel in chosen.spec.channels:
        try:
            record = send(channel, message, origin=f"alert test {rule}")
        except NotificationError as exc:
            click.echo(f"{channel}: FAILED: {exc}", err=True)
            failed += 1
            continue
        click.echo(f"{channel}: {record.status} ({record.response or ''})")
    if failed:
        raise SystemExit(1)


@alerts.command("silence")
@click.option(
    "--match",
    "matches",
    multiple=True,
    required=True,
    help="label=value, label!=value, label=~re, label!~re (repeatable: all must match).",
)
@click.option("--for", "duration", required=True, help="How long: 30m, 2h, 1d.")
@click.option("--comment", required=True, help="Why (shown with the silence).")
def silence(matches: tuple[str, ...], duration: str, comment: str) -> None:
    """Mute the alerts matching every --match for a while. Audited as alerts.silence.create."""
    from orchestration.cli.keys import cli_actor
    from orchestration.kernel import audit
    from orchestration.kernel.times import parse_duration
    from orchestration.store.bootstrap import migrate_store
    from sensors.alerts.silences import SilenceError, create_silence, parse_matcher

    span = parse_duration(duration)
    if span is None:
        raise click.BadParameter(f"{duration!r} is not a duration (30m, 2h, 1d)", param_hint="--for")
    try:
        matchers = [parse_matcher(text) for text in matches]
        migrate_store()
        created = create_silence(matchers, duration=span, comment=comment, created_by=cli_actor())
    except SilenceError as exc:
        raise click.BadParameter(str(exc), param_hint="--match") from None
    audit.append(
        "alerts.silence.create", actor=cli_actor(), target=created.id, origin="cli", details=created.as_json()
    )
    click.echo(
        f"silence {created.id} until {created.ends_at.isoformat(timespec='seconds')}: {', '.join(map(str, created.matchers))}"
    )


@alerts.command("silences")
@click.option("--all", "include_expired", is_flag=True, help="Expired silences too.")
def silences(include_expired: bool) -> None:
    """Active and pending silences."""
    from orchestration.store.bootstrap import migrate_store
    from sensors.alerts.silences import list_silences

    migrate_store()
    now = datetime.now(UTC)
    found = list_silences(include_expired=include_expired)
    if not found:
        click.echo("no silences")
        return
    rows = [
        (
            s.id,
            s.state(now),
            ", ".join(map(str, s.matchers)),
            s.ends_at.isoformat(timespec="seconds"),
            s.created_by,
            s.comment,
        )
        for s in found
    ]
    click.echo(render_table(("ID", "STATE", "MATCHERS", "ENDS", "BY", "COMMENT"), rows))


@alerts.command("expire")
@click.argument("silence_id")
def expire(silence_id: str) -> None:
    """End a silence now. Audited as alerts.silence.expire."""
    from orchestration.cli.keys import cli_actor
    from orchestration.kernel import audit
    from orchestration.store.bootstrap import migrate_store
    from sensors.alerts.silences import expire_silence

    migrate_store()
    ended = expire_silence(silence_id)
    if ended is None:
        raise click.BadParameter(f"no silence {silence_id!r}", param_hint="SILENCE_ID")
    audit.append(
        "alerts.silence.expire",
        actor=cli_actor(),
        target=ended.id,
        origin="cli",
        details={"ends_at": ended.ends_at.isoformat()},
    )
    click.echo(f"silence {ended.id} expired")
