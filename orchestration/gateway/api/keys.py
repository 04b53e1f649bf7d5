"""API key administration (scope `keys:manage` or `admin`); creation and revocation are audited."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, ConfigDict, Field

from orchestration.gateway.problems import ProblemError, problem_responses
from orchestration.gateway.security import requires
from orchestration.kernel import principals
from orchestration.kernel.principals import (
    ApiKeyConflict,
    ApiKeyError,
    ApiKeyInfo,
    ApiKeyNotFound,
    Principal,
    ScopeError,
)

router = APIRouter(tags=["keys"])

# The kernel's grammars, stated in the schema so clients (and fuzzers) know what is valid.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@-]*$"
SCOPE_PATTERN = r"^(admin|[a-z][a-z0-9_-]*:(\*|[a-z][a-z0-9_-]*(:(\*|[A-Za-z0-9][A-Za-z0-9_./-]*))?))$"
KeyName = Annotated[str, Path(max_length=200)]
Name = Annotated[str, Field(min_length=1, max_length=200, pattern=NAME_PATTERN)]


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    scopes: list[Annotated[str, Field(max_length=200, pattern=SCOPE_PATTERN)]] = Field(
        min_length=1, max_length=100
    )
    principal: Name | None = Field(default=None, description="Defaults to the key's name.")
    groups: list[Name] = Field(default_factory=list, max_length=100)
    expires_at: datetime | None = Field(default=None, description="Must be in the future.")


class KeyCreated(BaseModel):
    key: str = Field(description="The key itself. It is shown once and cannot be retrieved again.")
    info: ApiKeyInfo


class KeyList(BaseModel):
    keys: list[ApiKeyInfo]


@router.get("/keys", response_model=KeyList, responses=problem_responses(401, 403, 422, 503))
async def list_keys(_: Annotated[Principal, Depends(requires("keys:read"))], include_revoked: bool = False):
    """Every key (without secrets), revoked ones on request."""
    infos = await anyio.to_thread.run_sync(lambda: principals.list_api_keys(include_revoked=include_revoked))
    return KeyList(keys=infos)


@router.post(
    "/keys",
    response_model=KeyCreated,
    status_code=201,
    responses=problem_responses(400, 401, 403, 409, 413, 415, 422, 503),
)
async def create_key(body: KeyCreate, principal: Annotated[Principal, Depends(requires("keys:manage"))]):
    """Create a key; the answer holds the key once."""
    if any(scope == principals.ADMIN_SCOPE for scope in body.scopes) and not principal.allows(
        principals.ADMIN_SCOPE
    ):
        raise ProblemError(403, "only an admin may create admin keys", slug="forbidden", field="body.scopes")

    def create():
        return principals.create_api_key(
            body.name,
            scopes=body.scopes,
            principal=body.principal,
            groups=body.groups,
            expires_at=body.expires_at,
            created_by=principal.name,
            origin="gateway",
        )

    try:
        info, key = await anyio.to_thread.run_sync(create)
    except ScopeError as exc:
        raise ProblemError(
            422, str(exc), title="Invalid request", slug="validation", field="body.scopes"
        ) from None
    except ApiKeyError as exc:
        status = 409 if "exists" in str(exc) else 422
        raise ProblemError(status, str(exc), slug="conflict" if status == 409 else "validation") from None
    return KeyCreated(key=key, info=info)


@router.delete(
    "/keys/{name}", response_model=ApiKeyInfo, responses=problem_responses(401, 403, 404, 409, 422, 503)
)
async def revoke_key(name: KeyName, principal: Annotated[Principal, Depends(requires("keys:manage"))]):
    """Revoke a key at once (409 if it already is, or if it is the key making the call)."""
    if principal.via == f"api_key:{name}":
        raise ProblemError(409, "a key cannot revoke itself: use another key", slug="conflict")
    try:
        info = await anyio.to_thread.run_sync(
            lambda: principals.revoke_api_key(name, actor=principal.name, origin="gateway")
        )
    except ApiKeyNotFound as exc:
        raise ProblemError(404, str(exc), slug="not-found") from None
    except ApiKeyConflict as exc:
        raise ProblemError(409, str(exc), slug="conflict") from None
    return info
