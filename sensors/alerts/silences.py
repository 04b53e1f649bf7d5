"""Silences, as Alertmanager's: matchers on labels and a time range; a firing alert whose labels match
every matcher of an active silence is not notified (it stays in `GET /alerts`, marked muted).

Matchers are written `label=value`, `label!=value`, `label=~regex` or `label!~regex` (RE2, the whole
value must match). Creating and expiring a silence is audited by the API and the CLI.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from orchestration.errors import JunctionError
from orchestration.kernel.conditions import compile_regex

if TYPE_CHECKING:
    from sqlalchemy import Engine

MatchOp = Literal["=", "!=", "=~", "!~"]
_MATCHER = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*(.*?)\s*$")
MAX_SILENCE = timedelta(days=366)


class SilenceError(JunctionError):
    """A silence that cannot be created: a bad matcher or time range (the reason says which)."""


@dataclass(frozen=True)
class Matcher:
    label: str
    op: MatchOp
    value: str

    def __post_init__(self) -> None:
        if self.op in ("=~", "!~"):
            _, reason = compile_regex(self.value)
            if reason is not None:
                raise SilenceError(f"matcher {self}: {reason}")

    def __str__(self) -> str:
        return f"{self.label}{self.op}{self.value}"

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.label, "")
        if self.op in ("=", "!="):
            return (value == self.value) == (self.op == "=")
        regex, _ = compile_regex(self.value)
        return (regex.fullmatch(value) is not None) == (self.op == "=~")

    def as_json(self) -> dict[str, str]:
        return {"label": self.label, "op": self.op, "value": self.value}


def parse_matcher(text: str) -> Matcher:
    found = _MATCHER.fullmatch(text)
    if found is None:
        raise SilenceError(f"matcher {text!r}: write label=value, label!=value, label=~regex or label!~regex")
    label, op, value = found.groups()
    return Matcher(label, op, value.strip("\"'"))  # type: ignore[arg-type]


def matcher_from_json(data: Mapping[str, Any]) -> Matcher:
    return Matcher(str(data["label"]), data["op"], str(data["value"]))


@dataclass(frozen=True)
class Silence:
    id: str
    matchers: tuple[Matcher, ...]
    starts_at: datetime
    ends_at: datetime
    comment: str
    created_by: str
    created_at: datetime

    def active(self, now: datetime) -> bool:
        return self.starts_at <= now < self.ends_at

    def mutes(self, labels: Mapping[str, str]) -> bool:
        return all(matcher.matches(labels) for matcher in self.matchers)

    def state(self, now: datetime) -> str:
        return "pending" if now < self.starts_at else "active" if now < self.ends_at else "expired"

    def as_json(self, now: datetime | None = None) -> dict[str, Any]:
        now = now or datetime.now(UTC)
        return {
            "id": self.id,
            "matchers": [matcher.as_json() for matcher in self.matchers],
            "starts_at": self.starts_at.isoformat(),
            "ends_at": self.ends_at.isoformat(),
            "comment": self.comment,
            "created_by": self.created_by,
            "created_at": self.created_at.isoformat(),
            "state": self.state(now),
        }


def _silence(row: Any) -> Silence:
    return Silence(
        id=row.id,
        matchers=tuple(matcher_from_json(item) for item in row.matchers),
        starts_at=row.starts_at,
        ends_at=row.ends_at,
        comment=row.comment,
        created_by=row.created_by,
        created_at=row.created_at,
    )


def create_silence(
    matchers: list[Matcher],
    *,
    duration: timedelta | None = None,
    ends_at: datetime | None = None,
    starts_at: datetime | None = None,
    comment: str,
    created_by: str,
    engine: Engine | None = None,
) -> Silence:
    from orchestration.store import session_scope
    from orchestration.store.models import AlertSilence

    now = datetime.now(UTC)
    starts_at = starts_at or now
    if not matchers:
        raise SilenceError("a silence needs at least one matcher (it would mute every alert)")
    if not comment.strip():
        raise SilenceError("a silence needs a comment: who reads the alert list must know why it is quiet")
    if (duration is None) == (ends_at is None):
        raise SilenceError("give the silence a duration or an end, not both")
    ends_at = ends_at or starts_at + (duration or timedelta())
    if ends_at <= starts_at:
        raise SilenceError("a silence must end after it starts")
    if ends_at - starts_at > MAX_SILENCE:
        raise SilenceError("a silence may last at most 366 days")
    silence = Silence(
        str(uuid.uuid4()), tuple(matchers), starts_at, ends_at, comment.strip(), created_by, now
    )
    with session_scope(engine) as session:
        session.add(
            AlertSilence(
                id=silence.id,
                matchers=[matcher.as_json() for matcher in matchers],
                starts_at=starts_at,
                ends_at=ends_at,
                comment=silence.comment,
                created_by=created_by[:200],
                created_at=now,
            )
        )
    return silence


def list_silences(engine: Engine | None = None, *, include_expired: bool = False) -> list[Silence]:
    from sqlalchemy import select

    from orchestration.store import session_scope
    from orchestration.store.models import AlertSilence

    query = select(AlertSilence).order_by(AlertSilence.created_at)
    if not include_expired:
        query = query.where(AlertSilence.ends_at > datetime.now(UTC))
    with session_scope(engine) as session:
        return [_silence(row) for row in session.scalars(query)]


def get_silence(silence_id: str, engine: Engine | None = None) -> Silence | None:
    from orchestration.store import session_scope
    from orchestration.store.models import AlertSilence

    with session_scope(engine) as session:
        row = session.get(AlertSilence, silence_id)
        return _silence(row) if row is not None else None


def expire_silence(silence_id: str, engine: Engine | None = None) -> Silence | None:
    """End a silence now (kept, expired, for the record); None when there is no such silence."""
    from orchestration.store import session_scope
    from orchestration.store.models import AlertSilence

    now = datetime.now(UTC)
    with session_scope(engine) as session:
        row = session.get(AlertSilence, silence_id)
        if row is None:
            return None
        if row.ends_at > now:
            row.ends_at = max(now, row.starts_at)
        return _silence(row)
