"""Runs: status with a step summary and a link into the Dagster UI; cancellation."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request
from pydantic import BaseModel, Field

from orchestration.gateway.api.common import record, timestamp, ui_run_url
from orchestration.gateway.dagster_client import DagsterRequestError, get_run, terminate_run
from orchestration.gateway.problems import ProblemError, problem_responses
from orchestration.gateway.security import requires
from orchestration.kernel.principals import Principal

router = APIRouter(tags=["runs"])

RunId = Annotated[str, Path(pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")]


class StepSummary(BaseModel):
    key: str
    status: str | None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    attempts: int


class RunDetail(BaseModel):
    run_id: str
    job_name: str
    status: str
    created_at: datetime | None
    started_at: datetime | None
    ended_at: datetime | None
    tags: dict[str, str]
    assets: list[str] = Field(description="The asset selection, for asset materialization runs.")
    steps: list[StepSummary]
    step_counts: dict[str, int] = Field(description="Steps by status.")
    can_cancel: bool
    url: str


class CancelResult(BaseModel):
    run_id: str
    status: str


@router.get("/runs/{run_id}", response_model=RunDetail, responses=problem_responses(401, 403, 404, 422, 503))
async def run_status(
    run_id: RunId, request: Request, _: Annotated[Principal, Depends(requires("runs:read", read_only=True))]
):
    """A run's status, times, tags and a summary of its steps."""
    run = await get_run(request.app.state.dagster, run_id)
    if run is None:
        raise ProblemError(404, f"no run {run_id}", slug="not-found")
    steps = [
        StepSummary(
            key=step["stepKey"],
            status=step["status"],
            started_at=timestamp(step["startTime"]),
            ended_at=timestamp(step["endTime"]),
            attempts=max(1, len(step["attempts"])),
        )
        for step in run["stepStats"]
    ]
    counts: dict[str, int] = {}
    for step in steps:
        counts[step.status or "UNKNOWN"] = counts.get(step.status or "UNKNOWN", 0) + 1
    return RunDetail(
        run_id=run["runId"],
        job_name=run["jobName"],
        status=run["status"],
        created_at=timestamp(run["creationTime"]),
        started_at=timestamp(run["startTime"]),
        ended_at=timestamp(run["endTime"]),
        tags={tag["key"]: tag["value"] for tag in run["tags"]},
        assets=sorted("/".join(key["path"]) for key in run["assetSelection"] or []),
        steps=steps,
        step_counts=counts,
        can_cancel=run["canTerminate"],
        url=ui_run_url(request, run["runId"]),
    )


@router.post(
    "/runs/{run_id}/cancel",
    response_model=CancelResult,
    status_code=202,
    responses=problem_responses(401, 403, 404, 409, 422, 503),
)
async def cancel_run(
    run_id: RunId, request: Request, principal: Annotated[Principal, Depends(requires("runs:cancel"))]
):
    """Ask Dagster to cancel a queued or running run (409 when it has already finished)."""
    try:
        run = await terminate_run(request.app.state.dagster, run_id)
    except DagsterRequestError as exc:
        if exc.kind == "RunNotFoundError":
            raise ProblemError(404, f"no run {run_id}", slug="not-found") from None
        raise ProblemError(409, str(exc), slug="not-cancellable") from None
    await record("run.cancel", principal, f"run:{run_id}", {})
    return CancelResult(run_id=run["runId"], status=run["status"])
