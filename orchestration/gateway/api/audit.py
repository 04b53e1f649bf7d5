"""The audit log, queried (read-only: the log is append-only by design)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from orchestration.gateway.problems import problem_responses
from orchestration.gateway.security import requires
from orchestration.kernel import audit
from orchestration.kernel.audit import AuditRecord
from orchestration.kernel.principals import Principal

router = APIRouter(tags=["audit"])


class AuditPage(BaseModel):
    entries: list[AuditRecord] = Field(description="Newest first; hashes let a client re-verify the chain.")
    next_before_id: int | None = None


@router.get("/audit", response_model=AuditPage, responses=problem_responses(401, 403, 422, 503))
async def query_audit(
    _: Annotated[Principal, Depends(requires("audit:read"))],
    actor: str | None = Query(default=None, max_length=200),
    action: str | None = Query(default=None, max_length=200),
    target: str | None = Query(default=None, max_length=500),
    since: datetime | None = Query(default=None, description="Inclusive (ISO 8601)."),
    until: datetime | None = Query(default=None, description="Exclusive (ISO 8601)."),
    limit: int = Query(default=100, ge=1, le=1000),
    before_id: int | None = Query(
        default=None, ge=1, le=2**62, description="Page backwards: the last page's smallest id."
    ),
):
    """Entries newest first, filtered; page with `before_id`."""
    entries = await anyio.to_thread.run_sync(
        lambda: audit.query(
            actor=actor,
            action=action,
            target=target,
            since=since,
            until=until,
            limit=limit,
            before_id=before_id,
        )
    )
    return AuditPage(entries=entries, next_before_id=entries[-1].id if len(entries) == limit else None)
