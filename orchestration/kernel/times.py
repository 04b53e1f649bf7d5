"""Durations and instants as people write them in specs and on the command line.

`500ms`, `30s`, `90m`, `12h`, `30d`, `2w` for durations; ISO 8601 for instants, naive meaning UTC. One syntax for
stream retention, CLI `--since`/`--expires`, and (later) workflow delays.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated

from pydantic import AfterValidator

_DURATION = re.compile(r"^(\d+)(ms|[smhdw])$")
_DURATION_UNITS = {
    "ms": "milliseconds",
    "s": "seconds",
    "m": "minutes",
    "h": "hours",
    "d": "days",
    "w": "weeks",
}


def parse_duration(text: str) -> timedelta | None:
    """`500ms`, `30s`, `90m`, `12h`, `30d`, `2w` -> a timedelta; anything else -> None."""
    match = _DURATION.match(text.strip())
    if not match:
        return None
    return timedelta(**{_DURATION_UNITS[match.group(2)]: int(match.group(1))})


def check_duration(text: str) -> str:
    """`text` itself when it is a duration; else the ValueError pydantic reports for the field."""
    if parse_duration(text) is None:
        raise ValueError(f"{text!r} is not a duration (90m, 12h, 2d, 1w)")
    return text


def duration_seconds(text: str) -> float:
    """A duration already checked (a `DurationText` field) in seconds."""
    parsed = parse_duration(text)
    if parsed is None:
        raise ValueError(f"{text!r} is not a duration (90m, 12h, 2d, 1w)")
    return parsed.total_seconds()


# A spec field holding a duration as written (`timeout: 2h`), checked where the spec is validated.
DurationText = Annotated[str, AfterValidator(check_duration)]


def parse_instant(text: str) -> datetime | None:
    """An ISO 8601 date or date-time (`2027-01-01`, `2027-01-01T00:00Z`); naive means UTC."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
