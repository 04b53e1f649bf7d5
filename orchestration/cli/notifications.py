"""`junction notifications outbox|flush`: read what the `outbox` channels wrote; send due digests."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from resources.notifications import OutboxChannel

FOLLOW_POLL_INTERVAL_S = 0.5


@click.group()
def notifications() -> None:
    """Notification channels (resources/channels.yaml) and the messages they sent."""


@notifications.command()
@click.argument("channel", required=False)
@click.option("--last", type=click.IntRange(min=1), help="Only the last N messages of each outbox.")
@click.option("--follow", "-f", is_flag=True, help="Keep waiting for new messages (Ctrl-C stops).")
@click.option("--json", "as_json", is_flag=True, help="The stored JSON lines, unchanged.")
def outbox(channel: str | None, last: int | None, follow: bool, as_json: bool) -> None:
    """Show the messages written by the outbox channels (all of them, or CHANNEL's), oldest first."""
    channels = _outbox_channels(channel)
    if not channels:
        click.echo("no outbox channels are declared in the channels file")
        return
    offsets: dict[Path, int] = {}
    shown = 0
    for outbox_channel in channels:
        lines, offsets[outbox_channel.path] = _complete_lines(outbox_channel.path, 0)
        for number, line in lines[-last:] if last else lines:
            shown += _show(outbox_channel.path, number, line, as_json)
    if not follow:
        if not shown:
            click.echo("no messages yet", err=True)
        return
    line_numbers = {path: _count_lines(path, offset) for path, offset in offsets.items()}
    while True:
        time.sleep(FOLLOW_POLL_INTERVAL_S)
        for path, offset in offsets.items():
            lines, offsets[path] = _complete_lines(path, offset, first_number=line_numbers[path] + 1)
            line_numbers[path] += len(lines)
            for number, line in lines:
                _show(path, number, line, as_json)


def _outbox_channels(name: str | None) -> list[OutboxChannel]:
    from resources.notifications import OutboxChannel, load_channels

    declared = load_channels()
    if name is None:
        return [channel for channel in declared.values() if isinstance(channel, OutboxChannel)]
    if name not in declared:
        known = ", ".join(sorted(declared)) or "none"
        raise click.BadParameter(f"unknown channel {name!r} (declared: {known})", param_hint="CHANNEL")
    channel = declared[name]
    if not isinstance(channel, OutboxChannel):
        raise click.BadParameter(
            f"channel {name!r} is a {channel.kind} channel, not an outbox", param_hint="CHANNEL"
        )
    return [channel]


def _complete_lines(path: Path, offset: int, first_number: int = 1) -> tuple[list[tuple[int, bytes]], int]:
    """The whole lines after `offset` (numbered), and the offset after the last of them.

    A line still being written has no line break yet: it is left for the next read.
    """
    try:
        with path.open("rb") as stream:
            stream.seek(offset)
            data = stream.read()
    except FileNotFoundError:
        return [], offset
    complete = data[: data.rfind(b"\n") + 1]
    lines = complete.splitlines()
    return list(enumerate(lines, start=first_number)), offset + len(complete)


def _count_lines(path: Path, offset: int) -> int:
    try:
        with path.open("rb") as stream:
            return stream.read(offset).count(b"\n")
    except FileNotFoundError:
        return 0


def _show(path: Path, number: int, line: bytes, as_json: bool) -> int:
    try:
        entry = json.loads(line)
    except ValueError:
        click.secho(f"{path}:{number}: not a JSON line, skipped", err=True, fg="yellow")
        return 0
    if as_json:
        click.echo(line.decode())
        return 1
    recipients = ", ".join(entry.get("recipients") or []) or "(no recipients)"
    moment = str(entry.get("time", ""))[:19].replace("T", " ")
    click.secho(f"{moment}  {entry.get('channel')}  → {recipients}", bold=True)
    click.echo(f"  {entry.get('subject', '')}")
    for body_line in str(entry.get("body", "")).splitlines():
        click.echo(f"    {body_line}")
    click.echo()
    return 1


@notifications.command()
@click.option("--channel", "names", multiple=True, help="Only this channel (repeatable); default: every one.")
def flush(names: tuple[str, ...]) -> None:
    """Send the digests of throttled and digesting channels that are due now.

    The `notification_digests` sensor does this every 30 s while the daemon runs; this is for a
    platform without it, or to see what is held.
    """
    from resources.notifications import held, load_channels

    channels = load_channels()
    unknown = sorted(set(names) - set(channels))
    if unknown:
        raise click.BadParameter(f"no channel named {', '.join(unknown)}", param_hint="--channel")
    chosen = {name: channel for name, channel in channels.items() if not names or name in names}
    sent = held.flush_held(channels=chosen)
    for record in sent:
        click.echo(f"{record.channel}: digest delivered ({record.subject})")
    waiting = {name: count for name, count in held.held_counts().items() if name in chosen}
    click.echo(f"{len(sent)} digest(s) sent")
    for name, count in sorted(waiting.items()):
        click.echo(f"{name}: {count} message(s) still held")
