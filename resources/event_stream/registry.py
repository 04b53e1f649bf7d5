"""The streams registry: declared streams, their payload JSON Schema and retention, in the platform store.

Streams are declared one per YAML file in `settings.streams_dir` (`sensors/streams/*.yaml`), loaded
with the kernel's `load_specs` (every problem reported as `file: field: reason`) and synced into the
`event_streams` table; the gateway API creates them through `StreamRegistry.upsert` as well. Both
backends read definitions from here, so a Redis deployment still keeps its registry in the store.

Ownership (as decK's managed entities, or n8n's workflows under source control): every stream has one
owner, its `origin` - `api` (`PUT /gateway/v1/streams/{name}`, or `upsert` from Python) or
`yaml:<file>` (the file of the streams folder declaring it) - and only its owner changes it:
- the YAML sync creates streams and updates those YAML owns (a stream moved to another file follows
  it); a file declaring a stream the API owns is a spec error naming the file and the stream, and the
  sync then writes nothing. An error rather than a warning because the sync runs when the platform
  starts, where a warning scrolls by unread while the file's schema and retention silently do not
  apply - the same reason a malformed stream file stops the start. The API's stream is untouched.
- `upsert(origin="api")` of a stream YAML owns raises `StreamOwnedElsewhere` (the gateway's 409, naming
  the file to edit).
Streams no longer declared by any file keep their declaration, events and owner. Only an explicit
handover changes an owner: `transfer` (`junction events transfer NAME --to yaml|api`, audited).

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
from typing import Any

import jsonschema_rs
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import Engine, select

from orchestration.kernel.spec_errors import SpecError, SpecProblem, load_named_specs
from resources.event_stream.core import (
    DEAD_LETTER_SUFFIX,
    STREAM_NAME_PATTERN,
    EventStreamError,
    StreamNotFound,
)

STREAM_NAME = re.compile(STREAM_NAME_PATTERN)
DEFAULT_IDEMPOTENCY_WINDOW_S = 24 * 3600
# Definitions are cached per process this long, so a stream changed through the API (or a YAML sync
# by another process) is picked up quickly without a store query per publish.
CACHE_TTL_S = 5.0


API_ORIGIN = "api"
YAML_ORIGIN = "yaml"  # `yaml:<file>`; a bare `yaml` was written before files were recorded


def yaml_origin(path: str | Path) -> str:
    """The origin of a stream declared in `path` (a file of the streams folder): `yaml:<file name>`."""
    return f"{YAML_ORIGIN}:{Path(path).name}"


def owner_kind(origin: str) -> str:
    """`api` or `yaml`: who may change a stream of this origin."""
    return YAML_ORIGIN if origin == YAML_ORIGIN or origin.startswith(YAML_ORIGIN + ":") else origin


def origin_file(origin: str) -> str | None:
    """The streams folder's file named by a `yaml:<file>` origin (None for other origins)."""
    kind, _, file = origin.partition(":")
    return file or None if kind == YAML_ORIGIN else None


class StreamOwnedElsewhere(EventStreamError):
    """A declaration of a stream another owner declared (its `origin`: `api` or `yaml:<file>`)."""

    def __init__(self, stream: str, owner: str, declared_by: str):
        self.stream, self.owner, self.declared_by = stream, owner, declared_by
        file = origin_file(owner)
        if owner_kind(owner) == YAML_ORIGIN:
            where = f"in the streams folder's file {file}" if file else "in the streams folder"
            message = (
                f"stream {stream!r} is declared {where}; change it there (applied when the platform starts)"
            )
        else:
            message = (
                f"stream {stream!r} is declared through the API (PUT /gateway/v1/streams/{stream}), "
                "which owns it; rename the stream in the file, remove the file, or hand the stream "
                f"over to the file with `junction events transfer {stream} --to yaml`"
            )
        super().__init__(message)

    @property
    def file(self) -> str | None:
        return origin_file(self.owner)


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


def check_name(value: str) -> str:
    """A stream's (or a subscription's) name as declared: `value`, or the ValueError saying why not."""
    if not STREAM_NAME.match(value):
        raise ValueError(
            "must be 1-150 characters: lowercase letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    return value


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
        return check_name(value)

    @field_validator("payload_schema")
    @classmethod
    def _schema_compiles(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            try:
                compile_schema(value)
            except jsonschema_rs.ValidationError as exc:
                raise ValueError(f"not a valid JSON Schema: {describe(exc, 'schema')}") from None
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
    origin: str = API_ORIGIN
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @cached_property
    def validator(self) -> jsonschema_rs.Validator | None:
        return compile_schema(self.payload_schema) if self.payload_schema is not None else None

    def validation_error(self, payload: Any) -> str | None:
        """Why `payload` does not match the schema (the first problem found), or None."""
        if self.validator is None:
            return None
        try:
            self.validator.validate(payload)
        except jsonschema_rs.ValidationError as exc:
            return describe(exc, "payload")
        except ValueError as exc:  # a value JSON has no type for, where the schema looks at it
            return f"payload is not JSON: {exc}"
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


def compile_schema(schema: dict[str, Any]) -> jsonschema_rs.Validator:
    """A payload schema's validator (jsonschema-rs: about a quarter of fastjsonschema's cost per event).

    The dialect is the schema's `$schema`, else draft 7; formats (`date-time`, `email`, …) are
    asserted in every dialect, as declared schemas have always been checked. `ValidationError` names
    what is wrong with a schema that is not one.

    Offline: a remote `$ref` is refused, never fetched. Schemas arrive through `PUT /v1/streams`, and
    a fetch would let any caller with that scope make the platform request an address of their choice
    (and make validation depend on a third party being up). References inside the schema still resolve.
    """
    if "$schema" in schema:
        return jsonschema_rs.validator_for(schema, validate_formats=True, offline=True)
    return jsonschema_rs.Draft7Validator(schema, validate_formats=True, offline=True)


def describe(error: jsonschema_rs.ValidationError, document: str) -> str:
    """`payload.items[0].sku: 5 is not of type "string"`: where in the document, then what."""
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error.instance_path)
    return f"{document}{where}: {error.message}"


def load_stream_specs(folder: str | Path | None = None) -> dict[Path, StreamSpec]:
    """Every `*.yaml`/`*.yml` in the streams folder, validated; a name declared twice is an error."""
    if folder is None:
        from orchestration.settings import get_settings

        folder = get_settings().streams_dir
    return load_named_specs(folder, StreamSpec, "stream")


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

    def upsert(
        self, spec: StreamSpec, origin: str = API_ORIGIN, *, take_over: bool = False
    ) -> StreamDefinition:
        """Create the stream or update its description, schema and retention (its events stay).

        `origin` is the declaring owner (`api`, or `yaml:<file>`); a stream of another owner raises
        `StreamOwnedElsewhere` and is left as it is (a YAML stream may move to another file), unless
        `take_over` (an explicit handover, `transfer`).
        """
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
            elif owner_kind(row.origin) != owner_kind(origin) and not take_over:
                raise StreamOwnedElsewhere(spec.name, row.origin, origin)
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
        """Load the streams folder and upsert every declaration as `yaml:<file>`.

        A file declaring a stream the API owns is a `SpecError` (every such file named, nothing
        written); streams no longer declared are kept.
        """
        specs = load_stream_specs(folder)
        owners = {definition.name: definition.origin for definition in self.list()}
        problems = [
            SpecProblem(
                "name", str(StreamOwnedElsewhere(spec.name, owners[spec.name], yaml_origin(path))), str(path)
            )
            for path, spec in specs.items()
            if spec.name in owners and owner_kind(owners[spec.name]) != YAML_ORIGIN
        ]
        if problems:
            raise SpecError(problems)
        return [self.upsert(spec, origin=yaml_origin(path)) for path, spec in specs.items()]

    def transfer(self, name: str, to: str, folder: str | Path | None = None) -> tuple[str, StreamDefinition]:
        """Hand stream `name` over to another owner; returns its previous origin and new definition.

        `to="yaml"`: to the file of the streams folder that declares it, whose declaration applies at
        once. `to="api"`: to the API, keeping its declaration; no file may declare it any more (else
        the next sync would fail). Without this, a stream never changes owner.
        """
        previous = self._fetch(name)
        declared = {spec.name: (path, spec) for path, spec in load_stream_specs(folder).items()}
        if to == YAML_ORIGIN:
            if name not in declared:
                raise EventStreamError(f"no file of the streams folder declares stream {name!r}")
            path, spec = declared[name]
            return previous.origin, self.upsert(spec, origin=yaml_origin(path), take_over=True)
        if to != API_ORIGIN:
            raise ValueError(f"a stream is owned by {API_ORIGIN!r} or {YAML_ORIGIN!r}, not {to!r}")
        if name in declared:
            raise EventStreamError(
                f"stream {name!r} is still declared in {declared[name][0]}; remove it from that file first"
            )
        spec = StreamSpec(
            name=name,
            description=previous.description,
            payload_schema=previous.payload_schema,
            retention=RetentionSpec(max_count=previous.max_count, max_age=previous.max_age_s),
            idempotency_window=previous.idempotency_window_s,
        )
        return previous.origin, self.upsert(spec, origin=API_ORIGIN, take_over=True)


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
