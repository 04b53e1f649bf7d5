"""Helpers shared by the `junction` command groups: times, durations and plain-text tables."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import click

_DURATION = re.compile(r"^(\d+)([mhdw])$")
_DURATION_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(text: str) -> timedelta | None:
    """`90m`, `12h`, `30d`, `2w` -> a timedelta; anything else -> None."""
    match = _DURATION.match(text.strip())
    if not match:
        return None
    return timedelta(**{_DURATION_UNITS[match.group(2)]: int(match.group(1))})


def parse_instant(text: str) -> datetime | None:
    """An ISO 8601 date or date-time (`2027-01-01`, `2027-01-01T00:00Z`); naive means UTC."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """`--since`: a duration ago (`24h`, `7d`) or an instant."""
    now = now or datetime.now(UTC)
    duration = parse_duration(text)
    if duration is not None:
        return now - duration
    moment = parse_instant(text)
    if moment is None:
        raise click.BadParameter(f"{text!r} is neither a duration (90m, 24h, 7d, 2w) nor an ISO date-time")
    return moment


def render_table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """Left-aligned columns separated by two spaces, as wide as their widest cell."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=False)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (headers, *rows)
    ]
    return "\n".join(lines)
