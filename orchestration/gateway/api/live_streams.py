"""Live subscriptions: the WebSocket endpoint, Server-Sent Events, stream tokens for browsers, and the
JavaScript client (the protocol: `orchestration/gateway/live/`, docs/STREAMING_LIVE.md)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

import anyio
import orjson
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, WebSocket
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field

from orchestration.gateway.api.common import record
from orchestration.gateway.api.streams import StreamCalls, gateway_events
from orchestration.gateway.live import protocol
from orchestration.gateway.live.connections import (
    ConnectionLimits,
    Heartbeats,
    LiveConnection,
    LiveStats,
    SseSubscriber,
)
from orchestration.gateway.live.hub import LiveHub
from orchestration.gateway.problems import ProblemError, problem_responses
from orchestration.gateway.security import (
    current_principal,
    mint_stream_token,
    principal_for_token,
    requires_or_stream_token,
)
from orchestration.gateway.security import unauthorized as unauthorized_problem
from orchestration.kernel.principals import Principal, ScopeError

JS_CLIENT = Path(__file__).resolve().parents[1] / "live" / "static" / "junction-live.js"


@asynccontextmanager
async def close_live_hub(app: FastAPI) -> AsyncIterator[None]:
    yield
    hub = getattr(app.state, "live_hub", None)
    if hub is not None:
        app.state.live_hub = None
        app.state.live_heartbeats.task.cancel()
        await hub.aclose()


router = APIRouter(tags=["streams"], lifespan=close_live_hub)
client_router = APIRouter(tags=["streams"])


def live_hub(connection: Request | WebSocket) -> LiveHub:
    app = connection.app
    if getattr(app.state, "live_hub", None) is None:
        app.state.live_hub = LiveHub(gateway_events(connection))
        app.state.live_stats = LiveStats()
        settings = app.state.settings
        app.state.live_limits = ConnectionLimits(settings.live_max_connections_per_key)
        app.state.live_heartbeats = Heartbeats(settings.live_heartbeat_s, settings.live_idle_timeout_s)
    return app.state.live_hub


# --- tokens ---------------------------------------------------------------------------------------------


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scopes: list[Annotated[str, Field(max_length=200)]] | None = Field(
        default=None,
        max_length=50,
        description="The scopes the token carries, each covered by the caller's; default: the caller's.",
    )


class StreamToken(BaseModel):
    token: str = Field(description="Pass as `?token=` to /v1/streams/ws or the SSE endpoint, or in `auth`.")
    expires_in_s: float = Field(description="It opens connections until then; open ones stay open.")
    scopes: list[str]


@router.post(
    "/streams/tokens",
    response_model=StreamToken,
    status_code=201,
    responses=problem_responses(401, 403, 422),
)
async def create_stream_token(
    request: Request,
    principal: Annotated[Principal | None, Depends(current_principal)],
    body: TokenRequest | None = None,
) -> StreamToken:
    """A short-lived token for a page's WebSocket or EventSource (browsers cannot set headers),
    carrying the caller's scopes or fewer."""
    if principal is None:
        raise unauthorized_problem("send an API key as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
    granted = tuple(scope.text for scope in principal.scopes)
    wanted = tuple(body.scopes) if body and body.scopes is not None else granted
    for index, text in enumerate(wanted):
        try:
            allowed = principal.allows(text)
        except ScopeError as exc:
            raise ProblemError(422, str(exc), slug="validation", field=f"body.scopes[{index}]") from None
        if not allowed:
            raise ProblemError(
                403,
                f"you cannot grant '{text}': your scopes do not cover it",
                slug="forbidden",
                field=f"body.scopes[{index}]",
            )
    settings = request.app.state.settings
    token = mint_stream_token(principal, wanted, settings)
    return StreamToken(token=token, expires_in_s=settings.live_token_ttl_s, scopes=list(wanted))


# --- WebSocket ------------------------------------------------------------------------------------------


async def _principal_of(websocket: WebSocket) -> Principal | None:
    """From the upgrade's headers or `?token=`, else from a first `auth` message; None: closed 4001."""
    from fastapi.security.utils import get_authorization_scheme_param

    # The header parsing of the HTTP security schemes (`security.bearer_scheme`), which take a Request.
    scheme, bearer = get_authorization_scheme_param(websocket.headers.get("authorization"))
    token = (
        (bearer if scheme.lower() == "bearer" else None)
        or websocket.headers.get("x-api-key")
        or websocket.query_params.get("token")
    )
    if not token:
        try:
            with anyio.fail_after(protocol.AUTH_TIMEOUT_S):
                first = await websocket.receive_text()
            message = protocol.parse_message(first)
        except (TimeoutError, protocol.ProtocolError, KeyError):
            message = None
        if not isinstance(message, protocol.Auth):
            await websocket.close(
                protocol.CLOSE_UNAUTHORIZED,
                "send a key or token: Authorization header, ?token=, or a first auth message",
            )
            return None
        token = message.token
    try:
        return await principal_for_token(websocket.app, token)
    except ProblemError as problem:
        await websocket.close(protocol.CLOSE_UNAUTHORIZED, problem.detail[:120])
        return None


@router.websocket("/streams/ws")
async def stream_websocket(websocket: WebSocket) -> None:
    """Subscribe to streams and publish to them over one WebSocket (JSON messages, see the docs)."""
    hub = live_hub(websocket)
    await websocket.accept()
    principal = await _principal_of(websocket)
    if principal is None:
        return
    app = websocket.app
    limits: ConnectionLimits = app.state.live_limits
    if not limits.acquire(principal.name):
        await websocket.close(
            protocol.CLOSE_TOO_MANY_CONNECTIONS,
            f"{principal.name} has {limits.limit} connections open on this gateway",
        )
        return
    stats: LiveStats = app.state.live_stats
    stats.connections += 1
    stats.connections_opened += 1
    connection = LiveConnection(websocket, hub, principal, app.state.settings, stats)
    heartbeats: Heartbeats = app.state.live_heartbeats
    heartbeats.connections.add(connection)
    try:
        await connection.serve()
    finally:
        heartbeats.connections.discard(connection)
        stats.connections -= 1
        limits.release(principal.name)
        for stream, count in connection.published.items():
            await record(
                "events.publish", principal, f"stream:{stream}", {"accepted": count, "via": "websocket"}
            )


# --- Server-Sent Events ---------------------------------------------------------------------------------


@router.get(
    "/streams/{name}/sse",
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "One SSE message per event."},
        **problem_responses(401, 403, 404, 422, 429, 503),
    },
)
async def stream_sse(
    name: str,
    request: Request,
    principal: Annotated[Principal, Depends(requires_or_stream_token("events:read:{name}"))],
    from_: Annotated[
        str,
        Query(alias="from", max_length=100, description="latest, earliest, an event id or an ISO time."),
    ] = "latest",
    filter_: Annotated[
        str | None, Query(alias="filter", max_length=10_000, description="A condition as JSON.")
    ] = None,
    last_event_id: Annotated[str | None, Header(max_length=100)] = None,
):
    """Events of the stream as Server-Sent Events; a reconnecting client's `Last-Event-ID` resumes
    after the last event it received (it wins over `from`). A browser's EventSource, which cannot
    send headers, passes a stream token as `?token=`."""
    from sse_starlette import EventSourceResponse

    hub = live_hub(request)
    try:
        condition = None if filter_ is None else orjson.loads(filter_)
        filter_parsed = protocol.Filter.parse(condition)
        cursor = protocol.start_cursor(last_event_id or from_)
    except orjson.JSONDecodeError as exc:
        raise ProblemError(
            422, f"filter is not JSON: {exc}", slug="validation", field="query.filter"
        ) from None
    except protocol.ProtocolError as error:
        field = "query.filter" if error.field == "filter" else "query.from"
        raise ProblemError(422, error.message, slug="validation", field=field) from None
    limits: ConnectionLimits = request.app.state.live_limits
    if not limits.acquire(principal.name):
        raise ProblemError(
            429,
            f"{principal.name} has {limits.limit} connections open on this gateway",
            slug="too-many-connections",
        )
    settings = request.app.state.settings
    subscriber = SseSubscriber(hub, name, filter_parsed, settings.live_send_queue_bytes)
    try:
        with StreamCalls():
            await hub.subscribe(subscriber.subscription, cursor)
    except BaseException:
        limits.release(principal.name)
        raise

    async def messages():
        try:
            async for message in subscriber.messages():
                yield message
        finally:
            limits.release(principal.name)

    return EventSourceResponse(
        messages(), ping=settings.live_heartbeat_s, headers={"Cache-Control": "no-store"}
    )


# --- the JavaScript client ------------------------------------------------------------------------------


@client_router.get("/live/junction-live.js", include_in_schema=False)
async def javascript_client() -> FileResponse:
    """The browser client of the live protocol (reconnects and resumes from the last id received)."""
    return FileResponse(JS_CLIENT, media_type="text/javascript", headers={"Cache-Control": "max-age=300"})
