"""Event streams: list and declare them, their statistics, publish events, read and replay pages of
events, and replay a stream trigger's batches as new runs.

The endpoints use the resource's async API (`open_async`): natively on redis.asyncio when
`JUNCTION_REDIS_URL` is set, in worker threads on the SQL backend. An unreachable Redis is a 503
problem - nothing was published, nothing is dropped silently. Each publish call is one audit entry
(with its counts and id range), however many events it carries.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any, Literal

import anyio.to_thread
from fastapi import APIRouter, Body, Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from orchestration.gateway.api.common import record
from orchestration.gateway.problems import FieldProblem, ProblemError, problem_responses
from orchestration.gateway.security import requires
from orchestration.kernel.principals import Principal
from resources.event_stream import (
    EventsLost,
    EventStreamUnavailable,
    EventToPublish,
    InvalidEventId,
    StreamNotFound,
)
from resources.event_stream.aio import AsyncEventStream, open_async
from resources.event_stream.core import position_id
from sensors.replays import REPLAY_ID_PATTERN, ReplayOutcome, new_replay_id


@asynccontextmanager
async def close_event_streams(app: FastAPI) -> AsyncIterator[None]:
    # Merged into the app's lifespan by `include_router`: the stream opened on first use is closed
    # when the gateway stops.
    yield
    events = getattr(app.state, "event_streams", None)
    if events is not None:
        app.state.event_streams = None
        await events.aclose()


router = APIRouter(tags=["streams"], lifespan=close_event_streams)

MAX_EVENTS_PER_CALL = 1000
MAX_PAGE = 1000
# An event id (`ms-seq` or `ms`) or an ISO 8601 date/time; the values are checked further in `_cursor`.
CURSOR_PATTERN = r"^\s*(\d{1,16}(-\d{1,19})?|\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?)?(Z|[+-]\d{2}:?\d{2})?)\s*$"
_open_lock = threading.Lock()


# --- models -------------------------------------------------------------------------------------------


class GroupStatsModel(BaseModel):
    name: str
    pending: int
    last_delivered_id: str
    lag: int | None = Field(description="Events not yet delivered to the group; null when unknown.")


class StreamStatsModel(BaseModel):
    stream: str
    length: int = Field(description="Events retained now.")
    events_added: int = Field(description="Events ever published.")
    first_id: str | None
    last_id: str | None
    max_deleted_id: str = Field(description="The highest id retention removed.")
    groups: list[GroupStatsModel]
    dead_lettered: int
    rate_1m: float = Field(description="Events per second published over the last minute.")
    rate_5m: float = Field(description="Events per second published over the last five minutes.")


class LiveFiguresModel(BaseModel):
    """The stream's live subscriptions on the gateway process that answered."""

    subscriptions: int
    events_read: int = Field(description="Events its live reader took from the stream.")
    events_delivered: int = Field(description="Events handed to its WebSocket and SSE subscribers.")


class StreamStatsWithLive(StreamStatsModel):
    live: LiveFiguresModel


class StreamDeclared(BaseModel):
    """What a stream is declared as (in YAML or through the API)."""

    name: str
    description: str
    payload_schema: dict[str, Any] | None
    retention: dict[str, int | None]
    idempotency_window_seconds: int
    origin: str = Field(
        description="Its owner, the only one that changes it: `api`, or `yaml:<file>` of the streams folder."
    )


class StreamSummary(StreamDeclared):
    stats: StreamStatsModel


class StreamsPage(BaseModel):
    streams: list[StreamSummary]


class EventToPublishModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    payload: Any = Field(description="The event, validated against the stream's payload schema.")
    idempotency_key: Annotated[str, Field(min_length=1, max_length=200)] | None = Field(
        default=None, description="A repeat within the stream's idempotency window is a duplicate."
    )


class PublishItemResult(BaseModel):
    index: int
    status: Literal["accepted", "duplicate", "rejected"]
    id: str | None = Field(default=None, description="The new id, or the original's for a duplicate.")
    reason: str | None = Field(default=None, description="Why the event was rejected.")


class PublishOutcome(BaseModel):
    stream: str
    accepted: int
    duplicates: int
    rejected: int
    results: list[PublishItemResult]


class EventModel(BaseModel):
    stream: str
    id: str
    time: datetime
    payload: Any


class EventsPage(BaseModel):
    stream: str
    events: list[EventModel]
    next: str | None = Field(
        description="Pass as `from` to read the following page (the last id read, or the cursor given)."
    )


# --- the stream backend --------------------------------------------------------------------------------


def gateway_events(request: Request) -> AsyncEventStream:
    """The app's event stream, opened on first use (Redis when configured, else the platform store)."""
    return app_events(request.app)


def app_events(app: FastAPI) -> AsyncEventStream:
    with _open_lock:
        if getattr(app.state, "event_streams", None) is None:
            from resources.event_stream import open_event_stream

            settings = app.state.settings
            app.state.event_streams = open_async(
                open_event_stream(redis_url=settings.redis_url, store_url=settings.store_url)
            )
        return app.state.event_streams


class StreamCalls:
    """Turns the resource's errors into the gateway's problems."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if isinstance(exc, StreamNotFound):
            raise ProblemError(404, f"no stream named {exc.stream!r}", slug="not-found") from None
        if isinstance(exc, EventStreamUnavailable):
            raise ProblemError(
                503, str(exc), title="Event stream unavailable", slug="stream-unavailable"
            ) from None
        if isinstance(exc, EventsLost):
            raise ProblemError(
                410,
                f"events {exc.from_id} .. {exc.to_id} of stream {exc.stream!r} were removed by retention "
                f"before they were read; continue with from={exc.to_id} to accept the loss",
                title="Events lost",
                slug="events-lost",
                field="query.from",
            ) from None
        return False


def stats_model(stats) -> StreamStatsModel:
    return StreamStatsModel.model_validate(stats.to_json())


# --- endpoints ----------------------------------------------------------------------------------------


@router.get("/streams", response_model=StreamsPage, responses=problem_responses(401, 403, 503))
async def list_streams(
    request: Request, _: Annotated[Principal, Depends(requires("events:read", read_only=True))]
):
    """Every declared stream with its definition and statistics."""
    events = gateway_events(request)
    with StreamCalls():
        definitions = await anyio.to_thread.run_sync(events.sync.registry.list)
        streams = [
            StreamSummary.model_validate(
                {**definition.to_json(), "stats": stats_model(await events.stats(definition.name))}
            )
            for definition in definitions
        ]
    return StreamsPage(streams=streams)


@router.get(
    "/streams/{name}/stats",
    response_model=StreamStatsWithLive,
    responses=problem_responses(401, 403, 404, 503),
)
async def stream_stats(
    name: str,
    request: Request,
    _: Annotated[Principal, Depends(requires("events:read:{name}", read_only=True))],
):
    """Retained and published counts, first/last ids, consumer groups with lag and pending counts, and
    this gateway process's live subscriptions."""
    with StreamCalls():
        stats = stats_model(await gateway_events(request).stats(name))
    hub = getattr(request.app.state, "live_hub", None)
    live = (
        hub.stream_figures(name)
        if hub is not None
        else {"subscriptions": 0, "events_read": 0, "events_delivered": 0}
    )
    return StreamStatsWithLive(**stats.model_dump(), live=LiveFiguresModel(**live))


@router.post(
    "/streams/{name}/events",
    response_model=PublishOutcome,
    status_code=201,
    responses={
        207: {
            "model": PublishOutcome,
            "description": "Some events were rejected (each with its reason); the others were stored.",
        },
        **problem_responses(400, 401, 403, 404, 413, 415, 422, 503),
    },
)
async def publish_events(
    name: str,
    body: Annotated[
        EventToPublishModel | list[EventToPublishModel],
        Body(description=f"One event, or an array of up to {MAX_EVENTS_PER_CALL}."),
    ],
    request: Request,
    principal: Annotated[Principal, Depends(requires("events:publish:{name}"))],
):
    """Publish one event or an array: 201 when every event was stored (or was a duplicate), 207 when
    some were rejected, 422 (reasons per item) when all were."""
    items = body if isinstance(body, list) else [body]
    if not items:
        raise ProblemError(422, "send at least one event", slug="validation", field="body")
    if len(items) > MAX_EVENTS_PER_CALL:
        raise ProblemError(
            422, f"at most {MAX_EVENTS_PER_CALL} events per call", slug="validation", field="body"
        )
    batch = [EventToPublish(item.payload, item.idempotency_key) for item in items]
    with StreamCalls():
        result = await gateway_events(request).publish_batch(name, batch)
    outcome = PublishOutcome(
        stream=name,
        accepted=len(result.accepted),
        duplicates=len(result.duplicates),
        rejected=len(result.rejected),
        results=[PublishItemResult(**item.to_json()) for item in result.results],
    )
    ids = [item.id for item in result.accepted]
    await record(
        "events.publish",
        principal,
        f"stream:{name}",
        {
            "accepted": outcome.accepted,
            "duplicates": outcome.duplicates,
            "rejected": outcome.rejected,
            "first_id": ids[0] if ids else None,
            "last_id": ids[-1] if ids else None,
        },
    )
    if outcome.rejected == len(items):
        prefix = "body" if isinstance(body, list) else None
        errors = [
            FieldProblem(
                field=f"{prefix}[{item.index}].payload" if prefix else "body.payload",
                message=item.reason or "rejected",
                type="rejected",
            )
            for item in result.rejected
        ]
        raise ProblemError(
            422,
            "; ".join(f"{e.field}: {e.message}" for e in errors),
            slug="validation",
            field=errors[0].field,
        )
    status = 207 if outcome.rejected else 201
    return JSONResponse(outcome.model_dump(mode="json"), status_code=status)


@router.get(
    "/streams/{name}/events",
    response_model=EventsPage,
    responses=problem_responses(401, 403, 404, 410, 422, 503),
)
async def read_events(
    name: str,
    request: Request,
    _: Annotated[Principal, Depends(requires("events:read:{name}", read_only=True))],
    from_: Annotated[
        str | None,
        Query(
            alias="from",
            max_length=100,
            pattern=CURSOR_PATTERN,
            description="An event id: the events after it (pass the previous page's `next`); or an "
            "ISO 8601 time: the events published at or after it. Default: the oldest retained event.",
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
):
    """A page of events in id order (read and replay); 410 names the range retention removed."""
    after = _cursor(from_)
    with StreamCalls():
        events = await gateway_events(request).read(name, after, limit=limit)
    return EventsPage(
        stream=name,
        events=[EventModel(**event.to_json()) for event in events],
        next=events[-1].id if events else after,
    )


def _cursor(value: str | None) -> str | None:
    return None if value is None else _position(value, "query.from", "after")


# --- replays as new runs --------------------------------------------------------------------------------


class ReplayRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    trigger: str = Field(min_length=1, max_length=200, description="The stream trigger's sensor name.")
    from_: str = Field(
        alias="from", max_length=100, pattern=CURSOR_PATTERN, description="First event: id or ISO 8601 time."
    )
    to: str = Field(max_length=100, pattern=CURSOR_PATTERN, description="Last event (inclusive): id or time.")
    replay_id: Annotated[str, Field(pattern=REPLAY_ID_PATTERN)] | None = Field(
        default=None,
        description="Names the replay in its run keys (`replay:{replay_id}:...`); the same id again "
        "launches nothing new. Default: a fresh id, so every call re-runs.",
    )


@router.post(
    "/streams/{name}/replays",
    response_model=ReplayOutcome,
    status_code=201,
    responses=problem_responses(400, 401, 403, 404, 409, 410, 413, 415, 422, 503),
)
async def replay_as_runs(
    name: str,
    body: ReplayRequest,
    request: Request,
    principal: Annotated[Principal, Depends(requires("events:replay:{name}"))],
):
    """Run a trigger again over the events `from`..`to`: the same batches it would make from `from`,
    launched as new runs under their own run keys (`replay:{replay_id}:...`), at most 100 per call.
    Runs already launched under the same replay id are not launched again
    (`junction events replay --as-runs` makes the same call)."""
    from orchestration.gateway.api.jobs import launch_refused
    from orchestration.gateway.dagster_client import DagsterRequestError
    from sensors import replays

    first = _position(body.from_, "body.from", "first")
    last = _position(body.to, "body.to", "last")
    try:
        with StreamCalls():
            return await replays.replay_as_runs(
                request.app.state.dagster,
                gateway_events(request).sync,
                stream=name,
                trigger=body.trigger,
                first_id=first,
                last_id=last,
                replay_id=body.replay_id or new_replay_id(),
                actor=principal.name,
                via="gateway",
            )
    except replays.ReplayRefused as exc:
        slug = "not-found" if exc.status == 404 else "validation"
        raise ProblemError(exc.status, str(exc), slug=slug, field=f"body.{exc.parameter}") from None
    except DagsterRequestError as exc:
        raise launch_refused(exc) from None


def _position(value: str, field: str, kind: Literal["after", "first", "last"]) -> str:
    """`core.position_id`, its refusal as a 422 naming `field`."""
    try:
        return position_id(value, kind)
    except InvalidEventId:
        raise ProblemError(
            422,
            f"{value!r} is neither an event id (ms-seq) nor an ISO 8601 time",
            slug="validation",
            field=field,
        ) from None


# --- declaring streams ------------------------------------------------------------------------------------


class StreamDeclaration(BaseModel):
    """A stream's declaration, as in a YAML file of the streams folder (the name is the path's)."""

    model_config = ConfigDict(extra="forbid")

    description: str = Field(default="", max_length=2000)
    payload_schema: dict[str, Any] | None = Field(default=None, description="JSON Schema of each payload.")
    retention: dict[str, int | str | None] = Field(
        default_factory=dict, description='{"max_count": 1000000, "max_age": "30d"}: either or both.'
    )
    idempotency_window: int | str = Field(default="24h", description="Seconds, or 15m / 12h / 7d / 2w.")


class StreamDefinitionModel(StreamDeclared):
    created_at: datetime | None
    updated_at: datetime | None


class StreamDetail(StreamDefinitionModel):
    stats: StreamStatsModel


@router.get(
    "/streams/{name}",
    response_model=StreamDetail,
    responses=problem_responses(401, 403, 404, 503),
)
async def get_stream(
    name: str,
    request: Request,
    _: Annotated[Principal, Depends(requires("events:read:{name}", read_only=True))],
):
    """The stream's declaration, its owner (`origin`: `api`, or `yaml:<file>` of the streams folder)
    and its statistics."""
    events = gateway_events(request)
    with StreamCalls():
        definition = await anyio.to_thread.run_sync(lambda: events.sync.registry.get(name))
        stats = stats_model(await events.stats(name))
    return StreamDetail.model_validate({**definition.to_json(), "stats": stats})


@router.put(
    "/streams/{name}",
    response_model=StreamDefinitionModel,
    responses=problem_responses(400, 401, 403, 404, 409, 413, 415, 422, 503),
)
async def declare_stream(
    name: str,
    body: StreamDeclaration,
    request: Request,
    principal: Annotated[Principal, Depends(requires("events:manage:{name}"))],
):
    """Declare the stream or change its description, schema and retention (its events stay). The API
    then owns it (`origin: api`) and the streams folder's YAML sync never changes it; a stream declared
    in a YAML file is 409, naming the file to edit."""
    from pydantic import ValidationError

    from resources.event_stream import StreamOwnedElsewhere, StreamSpec

    try:
        spec = StreamSpec.model_validate({"name": name, **body.model_dump(exclude_unset=True)})
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        field = "path.name" if where == "name" else f"body.{where}"
        raise ProblemError(422, f"{field}: {error['msg']}", slug="validation", field=field) from None
    events = gateway_events(request)
    try:
        definition = await anyio.to_thread.run_sync(lambda: events.sync.registry.upsert(spec, origin="api"))
    except StreamOwnedElsewhere as exc:
        folder = request.app.state.settings.streams_dir
        where = f"the file {folder / exc.file}" if exc.file else f"a file of {folder}"
        raise ProblemError(
            409,
            f"stream {name!r} is declared in {where} (origin {exc.owner!r}); change it there - the "
            "platform applies the streams folder when it starts - the API cannot change it (once no "
            f"file declares it, `junction events transfer {name} --to api` hands it to the API)",
            title="Stream declared in YAML",
            slug="declared-in-yaml",
            field="path.name",
        ) from None
    await record(
        "stream.declare",
        principal,
        f"stream:{name}",
        {"retention": definition.to_json()["retention"], "schema": definition.payload_schema is not None},
    )
    return StreamDefinitionModel.model_validate(definition.to_json())
