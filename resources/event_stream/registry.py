"""The streams registry: declared streams, their payload JSON Schema and retention, in the platform store.

Streams are declared one per YAML file in `settings.streams_dir` (`sensors/streams/*.yaml`), loaded
with the kernel's `load_specs` (every problem reported as `file: field: reason`) and synced into the
`event_streams` table; the gateway API creates them through `StreamRegistry.upsert` as well. Both
backends read definitions from here, so a Redis deployment still keeps its registry in the store.

A stream's dead-letter stream (`<name>:dead-letter`) needs no declaration: it takes its parent's
retention and has no payload schema.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import fastjsonschema
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import Engine, select

from orchestration.kernel.spec_errors import SpecError, SpecProblem, load_specs
from resources.event_stream.core import DEAD_LETTER_SUFFIX, STREAM_NAME_PATTERN, StreamNotFound

STREAM_NAME = re.compile(STREAM_NAME_PATTERN)
DEFAULT_IDEMPOTENCY_WINDOW_S = 24 * 3600
# Definitions are cached per process this long, so a stream changed through the API (or a YAML sync
# by another process) is picked up quickly without a store query per publish.
CACHE_TTL_S = 5.0


def parse_seconds(value: Any) -> int:
    """A duration: whole seconds, or `90m`, `12h`, `7d`, `2w` (the kernel's duration syntax)."""
    from orchestration.kernel.times import parse_duration

    if isinstance(value, bool):
        raise ValueError("must be a duration such as 15m, 12h, 7d, 2w or a number of seconds")
    if isinstance(value, int):
        seconds = value
    else:
        duration = parse_duration(str(value))
        if duration is None:
            raise ValueError(f"{value!r} is not a duration such as 15m, 12h, 7d, 2w or a number of seconds")
        seconds = int(duration.total_seconds())
    if seconds <= 0:
        raise ValueError("must be positive")
    return seconds


class RetentionSpec(BaseModel):
    """How much of a stream is kept: the newest `max_count` events and/or those younger than `max_age`.

    Trimming is approximate while publishing (at least this much is kept) and exact with `trim()`.
    """

    model_config = ConfigDict(extra="forbid")

    max_count: int | None = Field(default=None, ge=1)
    max_age: int | None = Field(default=None, description="seconds, or 15m / 12h / 7d / 2w")

    @field_validator("max_age", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> int | None:
        return None if value is None else parse_seconds(value)


class StreamSpec(BaseModel):
    """One stream declaration (a YAML file in the streams folder, or a gateway API request body)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    payload_schema: dict[str, Any] | None = Field(default=None, description="JSON Schema of each payload")
    retention: RetentionSpec = RetentionSpec()
    idempotency_window: int = Field(
        default=DEFAULT_IDEMPOTENCY_WINDOW_S, description="how long an idempotency key is remembered"
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not STREAM_NAME.match(value):
            raise ValueError(
                "must be 1-150 characters: lowercase letters, digits, '.', '_' and '-', "
                "starting with a letter or digit"
            )
        return value

    @field_validator("payload_schema")
    @classmethod
    def _schema_compiles(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            try:
                fastjsonschema.compile(value)
            except fastjsonschema.JsonSchemaDefinitionException as exc:
                raise ValueError(f"not a valid JSON Schema: {exc}") from None
        return value

    @field_validator("idempotency_window", mode="before")
    @classmethod
    def _window(cls, value: Any) -> int:
        return parse_seconds(value)


@dataclass(frozen=True)
class StreamDefinition:
    """A stream as the backends use it; the schema validator is compiled once per definition."""

    name: str
    description: str = ""
    payload_schema: dict[str, Any] | None = None
    max_count: int | None = None
    max_age_s: int | None = None
    idempotency_window_s: int = DEFAULT_IDEMPOTENCY_WINDOW_S
    origin: str = "api"
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @cached_property
    def validator(self):
        return fastjsonschema.compile(self.payload_schema) if self.payload_schema is not None else None

    def validation_error(self, payload: Any) -> str | None:
        """Why `payload` does not match the schema, or None."""
        if self.validator is None:
            return None
        try:
            self.validator(payload)
        except fastjsonschema.JsonSchemaValueException as exc:
            # fastjsonschema names the document `data`; the caller knows it as the payload.
            return (
                "payload" + exc.message.removeprefix("data")
                if exc.message.startswith("data")
                else exc.message
            )
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "payload_schema": self.payload_schema,
            "retention": {"max_count": self.max_count, "max_age_seconds": self.max_age_s},
            "idempotency_window_seconds": self.idempotency_window_s,
            "origin": self.origin,
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "updated_at": self.updated_at.isoformat() if self.updated_at else None,
        }


def load_stream_specs(folder: str | Path | None = None) -> dict[Path, StreamSpec]:
    """Every `*.yaml`/`*.yml` in the streams folder, validated; a name declared twice is an error."""
    if folder is None:
        from orchestration.settings import get_settings

        folder = get_settings().streams_dir
    folder = Path(folder)
    paths = sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]) if folder.is_dir() else []
    specs = load_specs(paths, StreamSpec)
    seen: dict[str, Path] = {}
    problems = []
    for path, spec in specs.items():
        if spec.name in seen:
            problems.append(
                SpecProblem(
                    "name", f"stream {spec.name!r} is already declared in {seen[spec.name]}", str(path)
                )
            )
        seen.setdefault(spec.name, path)
    if problems:
        raise SpecError(problems)
    return specs


class StreamRegistry:
    """Declared streams in the platform store's `event_streams` table."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._cache: dict[str, tuple[float, StreamDefinition]] = {}
        self._lock = threading.Lock()

    @classmethod
    def for_url(cls, store_url: str | None = None) -> StreamRegistry:
        from orchestration.store.db import get_engine

        return cls(get_engine(store_url))

    def get(self, name: str) -> StreamDefinition:
        """The stream's definition (cached for a few seconds); `StreamNotFound` if undeclared."""
        with self._lock:
            cached = self._cache.get(name)
        if cached is not None and time.monotonic() - cached[0] < CACHE_TTL_S:
            return cached[1]
        if name.endswith(DEAD_LETTER_SUFFIX):
            parent = self.get(name.removesuffix(DEAD_LETTER_SUFFIX))
            definition = StreamDefinition(
                name=name,
                description=f"events the consumer groups of {parent.name!r} gave up on",
                max_count=parent.max_count,
                max_age_s=parent.max_age_s,
                idempotency_window_s=parent.idempotency_window_s,
                origin="dead-letter",
            )
        else:
            definition = self._fetch(name)
        with self._lock:
            self._cache[name] = (time.monotonic(), definition)
        return definition

    def _fetch(self, name: str) -> StreamDefinition:
        from orchestration.store.db import session_scope
        from orchestration.store.models import EventStreamDefinition

        with session_scope(self.engine) as session:
            row = session.get(EventStreamDefinition, name)
            if row is None:
                raise StreamNotFound(name)
            return _definition(row)

    def list(self) -> list[StreamDefinition]:
        from orchestration.store.db import session_scope
        from orchestration.store.models import EventStreamDefinition

        with session_scope(self.engine) as session:
            rows = session.scalars(select(EventStreamDefinition).order_by(EventStreamDefinition.name))
            return [_definition(row) for row in rows]

    def upsert(self, spec: StreamSpec, origin: Literal["yaml", "api"] = "api") -> StreamDefinition:
        """Create the stream or update its description, schema and retention (its events stay)."""
        from orchestration.store.db import session_scope
        from orchestration.store.models import EventStreamDefinition

        now = datetime.now(UTC)
        values = {
            "description": spec.description,
            "payload_schema": spec.payload_schema,
            "retention_max_count": spec.retention.max_count,
            "retention_max_age_seconds": spec.retention.max_age,
            "idempotency_window_seconds": spec.idempotency_window,
            "origin": origin,
        }
        with session_scope(self.engine, write_lock=True) as session:
            row = session.get(EventStreamDefinition, spec.name, with_for_update=True)
            if row is None:
                row = EventStreamDefinition(name=spec.name, created_at=now, updated_at=now, **values)
                session.add(row)
            elif any(getattr(row, key) != value for key, value in values.items()):
                for key, value in values.items():
                    setattr(row, key, value)
                row.updated_at = now
            session.flush()
            definition = _definition(row)
        with self._lock:
            self._cache.pop(spec.name, None)
            self._cache.pop(spec.name + DEAD_LETTER_SUFFIX, None)
        return definition

    def sync_declared(self, folder: str | Path | None = None) -> list[StreamDefinition]:
        """Load the streams folder and upsert every declaration (streams no longer declared are kept)."""
        return [self.upsert(spec, origin="yaml") for spec in load_stream_specs(folder).values()]


def _definition(row) -> StreamDefinition:
    return StreamDefinition(
        name=row.name,
        description=row.description,
        payload_schema=row.payload_schema,
        max_count=row.retention_max_count,
        max_age_s=row.retention_max_age_seconds,
        idempotency_window_s=row.idempotency_window_seconds,
        origin=row.origin,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )
