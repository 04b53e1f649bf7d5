"""The cache's namespaces and invalidation: `GET /v1/caches[/{namespace}]` (scope `caches:read`) and
`POST /v1/caches/{namespace}/invalidations` (scope `caches:manage`, audited).

`figures` are this gateway process's own (its memory layer, its lookups); `all_processes` sums
every process that reported to the platform store in the last minute (`resources/cache/reporting.py`).
What the layers below memory hold is shared. An invalidation is global: it removes the keys or tags
from every layer and, through Redis, from every process's memory.
"""

from __future__ import annotations

from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, ConfigDict, Field, model_validator

from orchestration.gateway.api.common import record
from orchestration.gateway.problems import ProblemError, problem_responses
from orchestration.gateway.security import requires
from orchestration.kernel.principals import Principal

router = APIRouter(tags=["caches"])
NamespaceName = Annotated[str, Path(max_length=100, pattern=r"^[a-z][a-z0-9_]*$")]


class NamespaceInfo(BaseModel):
    namespace: str
    policy: dict[str, Any] = Field(description="As declared in caches.yaml (defaults applied).")
    layers_active: list[str] = Field(
        description="The declared layers this process uses (no Redis: left out)."
    )
    figures: dict[str, Any] = Field(
        description="This process's figures: hits, misses, latencies, bytes, loads."
    )
    all_processes: dict[str, Any] | None = Field(
        default=None,
        description="The figures of every process that reported in the last minute, summed (latency "
        "percentiles: the slowest process's); null before any reported.",
    )


class NamespaceList(BaseModel):
    namespaces: list[NamespaceInfo]


class Invalidation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[Annotated[str, Field(min_length=1, max_length=500)]] = Field(
        default_factory=list, max_length=1000
    )
    tags: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=list, max_length=1000
    )

    @model_validator(mode="after")
    def _something(self) -> Invalidation:
        if not self.keys and not self.tags:
            raise ValueError("name at least one key or tag")
        return self


class Invalidated(BaseModel):
    namespace: str
    keys: list[str] = Field(description="The keys given and those the tags covered.")


def _info(name: str, across: dict[str, Any]) -> NamespaceInfo:
    from resources.cache import open_cache

    cache = open_cache(name)
    figures = cache.to_json()
    return NamespaceInfo(
        namespace=name,
        policy=cache.spec.model_dump(),
        layers_active=figures.pop("layers_declared"),
        figures={key: value for key, value in figures.items() if key != "namespace"},
        all_processes=across.get(name),
    )


def _across_processes(namespace: str | None = None) -> dict[str, Any]:
    from orchestration.store.db import get_engine
    from resources.cache.reporting import stored_figures

    return stored_figures(get_engine(), namespace)


def _known(name: str) -> None:
    from resources.cache import load_namespaces

    namespaces = load_namespaces()
    if name not in namespaces:
        raise ProblemError(
            404, f"no cache namespace {name} (namespaces: {', '.join(sorted(namespaces))})", slug="not-found"
        )


@router.get("/caches", response_model=NamespaceList, responses=problem_responses(401, 403, 503))
async def list_caches(_: Annotated[Principal, Depends(requires("caches:read", read_only=True))]):
    """Every declared namespace with its policy and this process's figures."""
    from resources.cache import load_namespaces

    def infos() -> list[NamespaceInfo]:
        across = _across_processes()
        return [_info(name, across) for name in sorted(load_namespaces())]

    return NamespaceList(namespaces=await anyio.to_thread.run_sync(infos))


@router.get(
    "/caches/{namespace}", response_model=NamespaceInfo, responses=problem_responses(401, 403, 404, 503)
)
async def get_cache(
    namespace: NamespaceName, _: Annotated[Principal, Depends(requires("caches:read", read_only=True))]
):
    """One namespace's policy and this process's figures."""
    _known(namespace)
    return await anyio.to_thread.run_sync(lambda: _info(namespace, _across_processes(namespace)))


@router.post(
    "/caches/{namespace}/invalidations",
    response_model=Invalidated,
    responses=problem_responses(400, 401, 403, 404, 413, 415, 422, 503),
)
async def invalidate(
    namespace: NamespaceName,
    body: Invalidation,
    principal: Annotated[Principal, Depends(requires("caches:manage"))],
):
    """Drop keys and tagged entries from every layer and every process's memory (audited)."""
    from resources.cache import open_cache

    _known(namespace)

    def drop() -> list[str]:
        cache = open_cache(namespace)
        dropped = set(body.keys)
        if body.keys:
            cache.delete(*body.keys)
        if body.tags:
            dropped |= cache.invalidate_tags(*body.tags)
        return sorted(dropped)

    keys = await anyio.to_thread.run_sync(drop)
    await record(
        "cache.invalidate",
        principal,
        f"cache:{namespace}",
        {"keys": body.keys, "tags": body.tags, "dropped": len(keys)},
    )
    return Invalidated(namespace=namespace, keys=keys)
