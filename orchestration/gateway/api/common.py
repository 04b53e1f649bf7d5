"""Helpers shared by the API's routers: timestamps, UI links, audit entries."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import anyio
from fastapi import Request

from orchestration.kernel import audit
from orchestration.kernel.principals import Principal


def timestamp(value: float | None) -> datetime | None:
    return datetime.fromtimestamp(value, UTC) if value else None


def ui_run_url(request: Request, run_id: str) -> str:
    return f"{request.app.state.dagster_ui_url(request)}/runs/{run_id}"


async def record(action: str, principal: Principal, target: str, details: dict[str, Any]) -> None:
    await anyio.to_thread.run_sync(
        lambda: audit.append(action, actor=principal.name, target=target, origin="gateway", details=details)
    )
