"""Helpers shared by the `junction` command groups: `--since` values and plain-text tables."""

from __future__ import annotations

from datetime import UTC, datetime

import click

from orchestration.kernel.times import parse_duration, parse_instant


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
