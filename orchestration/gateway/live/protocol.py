"""The live protocol: JSON text frames both ways, and the close codes (see docs/STREAMING_LIVE.md).

Client to server: `auth`, `subscribe`, `unsubscribe`, `publish`, `pong` (or any message: each one
counts as a sign of life). Server to client: `welcome`, `subscribed`, `unsubscribed`, `events`,
`events_lost`, `published`, `error`, `ping`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from orchestration.kernel.conditions import Condition, evaluate, parse_condition
from orchestration.kernel.spec_errors import SpecError
from resources.event_stream import InvalidEventId
from resources.event_stream.core import STREAM_NAME_PATTERN, position_id

# Close codes (4000-4999 are the application's, RFC 6455 section 7.4.2).
CLOSE_UNAUTHORIZED = 4001  # no valid credentials (header, ?token= or a first `auth` message)
CLOSE_IDLE = 4002  # nothing received (not even a pong) within the idle timeout
CLOSE_SLOW_CONSUMER = 4008  # the send queue overflowed; resume from the last id received
CLOSE_TOO_MANY_CONNECTIONS = 4009  # the principal's connection limit on this gateway process
CLOSE_STREAM_UNAVAILABLE = 1013  # "try again later": the stream backend cannot be read
AUTH_TIMEOUT_S = 10
MAX_SUBSCRIPTIONS = 100
MAX_FRAME_EVENTS = 500


class ProtocolError(Exception):
    """A message the server cannot act on: answered with an `error` message (the connection stays)."""

    def __init__(self, code: str, message: str, *, field: str | None = None, ref: str | None = None):
        super().__init__(message)
        self.code, self.message, self.field, self.ref = code, message, field, ref

    def to_message(self) -> dict[str, Any]:
        message = {"type": "error", "code": self.code, "message": self.message}
        if self.field:
            message["field"] = self.field
        if self.ref is not None:
            message["ref"] = self.ref
        return message


SubscriptionId = Annotated[str, Field(min_length=1, max_length=100)]
StreamName = Annotated[str, Field(pattern=STREAM_NAME_PATTERN)]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Auth(_Message):
    type: Literal["auth"]
    token: str = Field(min_length=1, max_length=4096, description="An API key, a JWT or a stream token.")


class Subscribe(_Message):
    type: Literal["subscribe"]
    id: SubscriptionId = Field(description="The client's name for the subscription; events carry it.")
    stream: StreamName
    filter: dict[str, Any] | None = Field(default=None, description="A kernel condition on the payload.")
    from_: str = Field(
        default="latest",
        alias="from",
        max_length=100,
        description="`latest` (new events only), `earliest` (the oldest retained), the last event id "
        "received (the events after it), or an ISO 8601 time (the events published at or after it).",
    )


class Unsubscribe(_Message):
    type: Literal["unsubscribe"]
    id: SubscriptionId


class Publish(_Message):
    type: Literal["publish"]
    ref: str | None = Field(default=None, max_length=100, description="Echoed in the acknowledgement.")
    stream: StreamName
    payload: Any
    idempotency_key: Annotated[str, Field(min_length=1, max_length=200)] | None = None


class Pong(_Message):
    type: Literal["pong"]


ClientMessage = Annotated[Auth | Subscribe | Unsubscribe | Publish | Pong, Field(discriminator="type")]
_CLIENT_MESSAGE = TypeAdapter(ClientMessage)


def parse_message(text: str | bytes) -> Auth | Subscribe | Unsubscribe | Publish | Pong:
    """A client frame as its message; `ProtocolError` naming the field when it is not one."""
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError("invalid-message", f"not JSON: {exc}") from None
    ref = data.get("ref") if isinstance(data, dict) and isinstance(data.get("ref"), str) else None
    try:
        return _CLIENT_MESSAGE.validate_python(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "message"
        raise ProtocolError("invalid-message", f"{where}: {error['msg']}", field=where, ref=ref) from None


def start_cursor(position: str) -> str | None:
    """A subscription's `from` as a read cursor: None (the oldest retained), `$` or an id."""
    text = position.strip()
    if text == "latest":
        return "$"
    if text == "earliest":
        return None
    try:
        return position_id(text)
    except InvalidEventId:
        raise ProtocolError(
            "validation",
            f"{position!r} is neither latest, earliest, an event id (ms-seq) nor an ISO 8601 time",
            field="from",
        ) from None


class Filter:
    """A subscription's condition on payloads (a non-object payload never matches a filter)."""

    def __init__(self, condition: Condition | None, key: bytes = b""):
        self.condition = condition
        # Subscriptions with equal filters share one evaluation per batch (`Subscription.deliver`).
        self.key = key

    @classmethod
    def parse(cls, data: dict[str, Any] | None, field: str = "filter") -> Filter:
        if data is None:
            return cls(None)
        try:
            return cls(parse_condition(data), orjson.dumps(data, option=orjson.OPT_SORT_KEYS))
        except SpecError as exc:
            raise ProtocolError("validation", str(exc).replace("\n", "; "), field=field) from None

    def matches(self, payload: Any) -> bool:
        return self.condition is None or (isinstance(payload, dict) and evaluate(self.condition, payload))


def encode(message: dict[str, Any]) -> str:
    return orjson.dumps(message).decode()


def encode_event(event) -> bytes:
    """One event as it appears in an `events` frame (encoded once, shared by every subscription)."""
    return orjson.dumps({"id": event.id, "time": event.time.isoformat(), "payload": event.payload})


def events_frame(subscription: str, stream: str, encoded_events: list[bytes]) -> str:
    head = orjson.dumps({"type": "events", "sub": subscription, "stream": stream})
    return (head[:-1] + b',"events":[' + b",".join(encoded_events) + b"]}").decode()
