"""The reverse proxy's admin API: its routes and upstreams, declared in the routes file or here.

Each object has one owner (`proxy/declarations.py`): a PUT or DELETE of one the routes file declares
is 409 naming the file. A write is checked with every other object (a route naming no known upstream
is 422, deleting an upstream a route uses is 409), applies in this gateway at once and in the others
within seconds, and is audited. Scope `gateway:manage` (the objects name internal addresses).
"""

from __future__ import annotations

from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Request, Response
from fastapi import Path as PathParameter
from pydantic import BaseModel, Field

from orchestration.gateway.api.common import record
from orchestration.gateway.problems import ProblemError, problem_responses
from orchestration.gateway.proxy.config import NAME, RouteSpec, UpstreamSpec
from orchestration.gateway.proxy.declarations import SECTIONS, DeclaredInFile, Kind, NotDeclared
from orchestration.gateway.security import requires
from orchestration.kernel.principals import Principal
from orchestration.kernel.spec_errors import SpecError

router = APIRouter(tags=["proxy"])
Name = Annotated[str, PathParameter(pattern=NAME, max_length=200)]
Manager = Annotated[Principal, Depends(requires("gateway:manage"))]
ORIGIN = Field(
    description="Its owner, the only one that changes it: `api`, or `yaml:<file>` (the routes file)."
)


class DeclaredRoute(BaseModel):
    name: str
    origin: str = ORIGIN
    spec: RouteSpec


class DeclaredUpstream(BaseModel):
    name: str
    origin: str = ORIGIN
    spec: UpstreamSpec
    state: dict[str, Any] = Field(description="Its targets now: health, breaker, requests in flight.")


class RouteList(BaseModel):
    routes: list[DeclaredRoute]


class UpstreamList(BaseModel):
    upstreams: list[DeclaredUpstream]


def _declared(request: Request, kind: Kind, name: str) -> DeclaredRoute | DeclaredUpstream:
    proxy = request.app.state.proxy
    config = proxy.config
    origin = proxy.origins.get((kind, name))
    if kind == "route":
        route = next((route for route in config.routes if route.name == name), None)
        if route is None:
            raise ProblemError(404, f"no proxy route named {name!r}", slug="not-found")
        return DeclaredRoute(name=name, origin=origin, spec=route.spec)
    upstream = config.upstreams.get(name)
    if upstream is None:
        raise ProblemError(404, f"no upstream named {name!r}", slug="not-found")
    return DeclaredUpstream(name=name, origin=origin, spec=upstream.spec, state=upstream.to_json())


async def _write(
    request: Request, kind: Kind, name: str, spec: BaseModel | None, principal: Principal
) -> bool:
    """Put (`spec`) or delete an API object and apply it here; whether it was new."""
    proxy = request.app.state.proxy
    if proxy.api is None:
        raise ProblemError(503, "this proxy has no platform store to keep API objects", slug="no-store")

    def write() -> bool:
        if spec is None:
            proxy.api.delete(kind, name, proxy.from_file, proxy.routes_file)
            new = False
        else:
            new = proxy.api.put(kind, name, spec, principal.name, proxy.from_file, proxy.routes_file)
        proxy.reload()
        return new

    try:
        new = await anyio.to_thread.run_sync(write)
    except DeclaredInFile as exc:
        raise ProblemError(
            409, str(exc), title="Declared in the routes file", slug="declared-in-yaml", field="path.name"
        ) from None
    except NotDeclared as exc:
        raise ProblemError(404, str(exc), slug="not-found") from None
    except SpecError as exc:
        if spec is None:  # what is left does not hold together: others use it
            raise ProblemError(
                409, f"{kind} {name!r} is in use: {exc}", title="In use", slug="in-use", field="path.name"
            ) from None
        problem = exc.problems[0]
        section, _, rest = problem.location.partition(".")
        own = f"{SECTIONS[kind]}.{name}"
        field = (
            "body" + problem.location[len(own) :]
            if problem.location == own or problem.location.startswith(own + ".")
            else f"{section}.{rest}"
        )
        raise ProblemError(422, str(exc), slug="validation", field=field) from None
    await record(
        f"proxy.{kind}.{'delete' if spec is None else 'declare'}",
        principal,
        f"{kind}:{name}",
        {} if spec is None else {"created": new, "spec": spec.model_dump(mode="json", exclude_unset=True)},
    )
    return new


@router.get("/routes", response_model=RouteList, responses=problem_responses(401, 403))
async def list_routes(request: Request, _: Manager):
    """Every proxy route, from the routes file and the API, with its owner."""
    return RouteList(
        routes=[_declared(request, "route", route.name) for route in request.app.state.proxy.config.routes]
    )


@router.get("/routes/{name}", response_model=DeclaredRoute, responses=problem_responses(401, 403, 404))
async def get_route(name: Name, request: Request, _: Manager):
    """One proxy route and its owner."""
    return _declared(request, "route", name)


@router.put(
    "/routes/{name}",
    response_model=DeclaredRoute,
    responses={201: {"model": DeclaredRoute}, **problem_responses(400, 401, 403, 409, 415, 422, 503)},
)
async def declare_route(
    name: Name, body: RouteSpec, request: Request, response: Response, principal: Manager
):
    """Declare or replace a route (201 when new); the API then owns it. A route of the routes file is
    409, naming the file."""
    if await _write(request, "route", name, body, principal):
        response.status_code = 201
    return _declared(request, "route", name)


@router.delete("/routes/{name}", status_code=204, responses=problem_responses(401, 403, 404, 409, 503))
async def delete_route(name: Name, request: Request, principal: Manager) -> Response:
    """Remove a route the API declared (one of the routes file is 409, naming the file)."""
    await _write(request, "route", name, None, principal)
    return Response(status_code=204)


@router.get("/upstreams", response_model=UpstreamList, responses=problem_responses(401, 403))
async def list_upstreams(request: Request, _: Manager):
    """Every upstream, from the routes file and the API, with its owner and its targets' state."""
    names = list(request.app.state.proxy.config.upstreams)
    return UpstreamList(upstreams=[_declared(request, "upstream", name) for name in names])


@router.get("/upstreams/{name}", response_model=DeclaredUpstream, responses=problem_responses(401, 403, 404))
async def get_upstream(name: Name, request: Request, _: Manager):
    """One upstream, its owner and its targets' state."""
    return _declared(request, "upstream", name)


@router.put(
    "/upstreams/{name}",
    response_model=DeclaredUpstream,
    responses={201: {"model": DeclaredUpstream}, **problem_responses(400, 401, 403, 409, 415, 422, 503)},
)
async def declare_upstream(
    name: Name, body: UpstreamSpec, request: Request, response: Response, principal: Manager
):
    """Declare or replace an upstream (201 when new; targets that stay keep their state). One of the
    routes file is 409, naming the file."""
    if await _write(request, "upstream", name, body, principal):
        response.status_code = 201
    return _declared(request, "upstream", name)


@router.delete("/upstreams/{name}", status_code=204, responses=problem_responses(401, 403, 404, 409, 503))
async def delete_upstream(name: Name, request: Request, principal: Manager) -> Response:
    """Remove an upstream the API declared; one a route still uses is 409 naming the route."""
    await _write(request, "upstream", name, None, principal)
    return Response(status_code=204)
