"""Durable webhook subscriptions: list, declare and remove them, and their delivery statistics; the
router's lifespan runs this process's dispatcher (`orchestration/gateway/live/dispatcher.py`).

Declaring one needs `subscriptions:manage:<name>` and `events:read:<stream>`: a subscription sends
the stream's events to a URL of the caller's choice, so it must be a caller who may read them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any

import anyio
import anyio.to_thread
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from pydantic import BaseModel, Field, ValidationError

from orchestration.gateway.api.common import record
from orchestration.gateway.api.streams import StreamCalls, app_events, gateway_events
from orchestration.gateway.live.dispatcher import Dispatcher
from orchestration.gateway.problems import ProblemError, problem_responses
from orchestration.gateway.security import requires
from orchestration.kernel.principals import Principal
from resources.event_stream.subscriptions import (
    SubscriptionNotFound,
    SubscriptionOwnedElsewhere,
    SubscriptionRegistry,
    SubscriptionSettings,
    SubscriptionSpec,
    declare,
)


@asynccontextmanager
async def run_dispatcher(app: FastAPI) -> AsyncIterator[None]:
    # Merged into the app's lifespan by `include_router` (after the streams router's, so it stops
    # before the event stream closes).
    settings = app.state.settings
    app.state.dispatcher = None
    if not settings.dispatcher_enabled:
        yield
        return
    dispatcher = Dispatcher(
        app_events(app),
        SubscriptionRegistry.for_url(settings.store_url),
        refresh_s=settings.dispatcher_refresh_s,
        claim_idle_s=settings.dispatcher_claim_idle_s,
        stop_grace_s=settings.dispatcher_stop_grace_s,
    )
    app.state.dispatcher = dispatcher
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(dispatcher.run)
        try:
            yield
        finally:
            await dispatcher.stop()


router = APIRouter(tags=["subscriptions"], lifespan=run_dispatcher)


class SubscriptionModel(SubscriptionSettings):
    name: str
    group: str = Field(description="The consumer group it reads the stream through.")
    origin: str = Field(
        description="Its owner, the only one that changes it: `api`, or `yaml:<file>` of the "
        "subscriptions folder."
    )
    created_at: datetime | None
    updated_at: datetime | None


class SubscriptionsPage(BaseModel):
    subscriptions: list[SubscriptionModel]


class GroupFigures(BaseModel):
    pending: int = Field(description="Events delivered to a dispatcher and not yet acknowledged.")
    lag: int | None = Field(description="Events not yet read by any dispatcher; null when unknown.")
    last_delivered_id: str


class DispatcherFigures(BaseModel):
    """What this gateway process's dispatcher did for the subscription since it started."""

    running: bool
    holds_lease: bool | None = Field(description="Ordered subscriptions: whether this process delivers it.")
    attempts: int
    failures: int = Field(description="Attempts answered with no 2xx, or not answered.")
    delivered: int = Field(description="Events acknowledged after a 2xx.")
    dead_lettered: int
    filtered: int = Field(description="Events the filter dropped.")
    redelivered: int = Field(description="Events claimed from a dispatcher that died.")
    events_lost: int = Field(description="Ranges retention removed before the group read them.")
    in_flight: int
    breaker_waits: int = Field(description="Times a delivery waited for the destination's open breaker.")
    latency_p50_ms: float | None = Field(description="Publish to acknowledged delivery.")
    latency_p99_ms: float | None
    last_status: int | None
    last_error: str | None
    last_delivered_at: float | None


class SubscriptionStats(BaseModel):
    name: str
    stream: str
    group: GroupFigures | None = Field(description="The consumer group, shared by every dispatcher.")
    dead_letters: int = Field(description="Records in the stream's dead letter (every group's).")
    instance: str = Field(description="The consumer name of the dispatcher that answered.")
    dispatcher: DispatcherFigures | None
    breaker: dict[str, Any] | None = Field(description="The destination's circuit breaker here.")


def registry_of(request: Request) -> SubscriptionRegistry:
    return SubscriptionRegistry.for_url(request.app.state.settings.store_url)


async def _get(request: Request, name: str):
    try:
        return await anyio.to_thread.run_sync(registry_of(request).get, name)
    except SubscriptionNotFound as exc:
        raise ProblemError(404, str(exc), slug="not-found") from None


def owned_elsewhere(request: Request, exc: SubscriptionOwnedElsewhere) -> ProblemError:
    folder = request.app.state.settings.subscriptions_dir
    return ProblemError(
        409,
        f"subscription {exc.name!r} is declared in the file {folder / (exc.file or '')} (origin "
        f"{exc.owner!r}); change it there - the platform applies the subscriptions folder when it starts",
        title="Subscription declared in YAML",
        slug="declared-in-yaml",
        field="path.name",
    )


@router.get("/subscriptions", response_model=SubscriptionsPage, responses=problem_responses(401, 403))
async def list_subscriptions(
    request: Request, _: Annotated[Principal, Depends(requires("subscriptions:read", read_only=True))]
):
    """Every declared subscription (YAML and API), with its owner."""
    declared = await anyio.to_thread.run_sync(registry_of(request).list)
    return SubscriptionsPage(subscriptions=[SubscriptionModel.model_validate(s.to_json()) for s in declared])


@router.get(
    "/subscriptions/{name}", response_model=SubscriptionModel, responses=problem_responses(401, 403, 404)
)
async def get_subscription(
    name: str,
    request: Request,
    _: Annotated[Principal, Depends(requires("subscriptions:read:{name}", read_only=True))],
):
    """The subscription's declaration and owner."""
    return SubscriptionModel.model_validate((await _get(request, name)).to_json())


@router.put(
    "/subscriptions/{name}",
    response_model=SubscriptionModel,
    responses={
        201: {"model": SubscriptionModel},
        **problem_responses(400, 401, 403, 404, 409, 413, 415, 422, 503),
    },
)
async def declare_subscription(
    name: str,
    body: SubscriptionSettings,
    request: Request,
    response: Response,
    principal: Annotated[Principal, Depends(requires("subscriptions:manage:{name}"))],
):
    """Declare the subscription (201) or replace it (200); its consumer group is created with it, from
    the stream's end (`start: latest`) or its oldest event (`earliest`), and keeps its position when
    the declaration changes. A subscription declared in a YAML file is 409, naming the file."""
    try:
        spec = SubscriptionSpec.model_validate({"name": name, **body.model_dump(exclude_unset=True)})
    except ValidationError as exc:
        error = exc.errors()[0]
        raise ProblemError(422, f"path.name: {error['msg']}", slug="validation", field="path.name") from None
    stream_scope = f"events:read:{spec.stream}"
    if not principal.allows(stream_scope):
        raise ProblemError(
            403,
            f"a subscription sends the stream's events elsewhere: it needs the scope '{stream_scope}' too",
            title="Forbidden",
            slug="forbidden",
            field="body.stream",
        )
    events = gateway_events(request)
    registry = registry_of(request)
    try:
        with StreamCalls():
            subscription, created = await anyio.to_thread.run_sync(
                lambda: declare(events.sync, registry, spec)
            )
    except SubscriptionOwnedElsewhere as exc:
        raise owned_elsewhere(request, exc) from None
    except ProblemError as problem:
        if problem.status == 404:  # the stream, not the subscription
            raise ProblemError(
                422, f"body.stream: no stream named {spec.stream!r}", slug="validation", field="body.stream"
            ) from None
        raise
    await record(
        "subscription.declare",
        principal,
        f"subscription:{name}",
        {"stream": spec.stream, "url": subscription.shown_url, "created": created},
    )
    response.status_code = 201 if created else 200
    return SubscriptionModel.model_validate(subscription.to_json())


@router.delete("/subscriptions/{name}", status_code=204, responses=problem_responses(401, 403, 404, 409, 503))
async def delete_subscription(
    name: str,
    request: Request,
    principal: Annotated[Principal, Depends(requires("subscriptions:manage:{name}"))],
) -> Response:
    """Remove an API subscription and its consumer group (its pending deliveries are dropped with it;
    the stream's events stay). One declared in YAML is 409."""
    try:
        subscription = await anyio.to_thread.run_sync(registry_of(request).delete, name)
    except SubscriptionNotFound as exc:
        raise ProblemError(404, str(exc), slug="not-found") from None
    except SubscriptionOwnedElsewhere as exc:
        raise owned_elsewhere(request, exc) from None
    events = gateway_events(request)
    try:
        with StreamCalls():
            await events.delete_group(subscription.stream, subscription.group)
    except ProblemError as problem:
        if problem.status != 404:  # a stream gone since has no group left either
            raise
    await record("subscription.delete", principal, f"subscription:{name}", {"stream": subscription.stream})
    return Response(status_code=204)


@router.get(
    "/subscriptions/{name}/stats",
    response_model=SubscriptionStats,
    responses=problem_responses(401, 403, 404, 503),
)
async def subscription_stats(
    name: str,
    request: Request,
    _: Annotated[Principal, Depends(requires("subscriptions:read:{name}", read_only=True))],
):
    """The consumer group's pending count and lag (every dispatcher's), the stream's dead letters, and
    this gateway process's delivery figures: attempts, failures, dead letters, latency p50/p99."""
    subscription = await _get(request, name)
    events = gateway_events(request)
    try:
        with StreamCalls():
            stats = await events.stats(subscription.stream)
    except ProblemError as problem:
        if problem.status != 404:
            raise
        stats = None
    group = None
    if stats is not None:
        found = [g for g in stats.groups if g.name == subscription.group]
        if found:
            group = GroupFigures(
                pending=found[0].pending, lag=found[0].lag, last_delivered_id=found[0].last_delivered_id
            )
    dispatcher: Dispatcher | None = getattr(request.app.state, "dispatcher", None)
    figures = dispatcher.stats(name) if dispatcher is not None else None
    destination = dispatcher.breakers.get(subscription.destination) if dispatcher is not None else None
    return SubscriptionStats(
        name=name,
        stream=subscription.stream,
        group=group,
        dead_letters=stats.dead_lettered if stats is not None else 0,
        instance=dispatcher.consumer if dispatcher is not None else "",
        dispatcher=DispatcherFigures(**figures) if figures is not None else None,
        breaker=destination.to_json() if destination is not None else None,
    )


class DeadLetter(BaseModel):
    id: str = Field(description="The record's id in the stream's dead letter.")
    time: datetime
    record: dict[str, Any] = Field(
        description="event_id, delivery_id, deliveries, last_status, last_answer, url, dead_at, payload."
    )


class DeadLettersPage(BaseModel):
    subscription: str
    dead_letters: list[DeadLetter]
    next: str | None = Field(description="Pass as `from` to read the following page.")


@router.get(
    "/subscriptions/{name}/dead-letters",
    response_model=DeadLettersPage,
    responses=problem_responses(401, 403, 404, 422, 503),
)
async def dead_letters(
    name: str,
    request: Request,
    principal: Annotated[Principal, Depends(requires("subscriptions:read:{name}", read_only=True))],
    from_: Annotated[
        str | None,
        Query(alias="from", max_length=60, pattern=r"^\d{1,16}(-\d{1,19})?$", description="A record id."),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
):
    """The events the subscription gave up on, oldest first, each with its last status and answer
    (`junction events subscriptions replay NAME` delivers them again). The records hold the events'
    payloads: this also needs `events:read:<stream>`."""
    from resources.event_stream.core import dead_letter_stream
    from resources.event_stream.subscriptions import is_dead_letter_of

    subscription = await _get(request, name)
    stream_scope = f"events:read:{subscription.stream}"
    if not principal.allows(stream_scope):
        raise ProblemError(
            403, f"the records hold the stream's events: this needs the scope '{stream_scope}'"
        )
    events = gateway_events(request)
    with StreamCalls():
        page = await events.read(dead_letter_stream(subscription.stream), from_, limit=limit)
    return DeadLettersPage(
        subscription=name,
        dead_letters=[
            DeadLetter(id=record.id, time=record.time, record=record.payload)
            for record in page
            if is_dead_letter_of(record.payload, subscription)
        ],
        next=page[-1].id if page else from_,
    )
