"""Workflows: the specs with their statistics by execution, their executions, and launching one.

Statistics are computed by `orchestration.workflows.stats` (as `junction workflows stats` does) from
Dagster's runs, read through GraphQL, and the platform store's checkpoints. A launch validates the
inputs against the spec's typed inputs (422 naming `body.inputs.<name>`), queues a run through
Dagster's run queue tagged with a new execution id, and is audited with the caller. Only workflows
whose spec declares the `api` trigger can be launched here: others answer 409 (the request is
well-formed and allowed, but the workflow is not open to API launches).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestration.gateway.api.common import record, ui_run_url
from orchestration.gateway.api.jobs import queue_run, repositories_with_job
from orchestration.gateway.dagster_client import runs_with_tags
from orchestration.gateway.problems import ProblemError, problem_responses
from orchestration.gateway.security import requires
from orchestration.kernel.principals import Principal
from orchestration.workflows import stats
from orchestration.workflows.context import KIND_TAG, WORKFLOW_TAG
from orchestration.workflows.launch import (
    accepts_api_launch,
    execution_tags,
    new_execution_id,
    validated_inputs,
)

router = APIRouter(tags=["workflows"])

WorkflowName = Annotated[str, Path(max_length=200, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
RunLimit = Annotated[int, Query(ge=1, le=50_000, description="Read at most this many of the newest runs.")]
ExecutionStatus = Literal["running", "waiting", "succeeded", "failed", "canceled"]


class WaitingInfo(BaseModel):
    step_id: str
    kind: str = Field(description="The parked step's type: approval, delay, sync.")
    since: datetime | None
    wake_at: datetime | None = Field(description="When the execution is due (none: on a decision).")
    summary: str = Field(
        default="", description="What it waits for, as the parked run's junction/waiting_on tag says."
    )


class ExecutionInfo(BaseModel):
    execution_id: str
    workflow: str
    status: ExecutionStatus
    runs: int
    run_ids: list[str]
    started_at: datetime | None
    ended_at: datetime | None
    wall_s: float | None = Field(description="First run start to last run end, parked time included.")
    active_s: float = Field(description="The sum of the runs' durations.")
    waiting: WaitingInfo | None
    failed_steps: list[str]


class WaitingOnInfo(BaseModel):
    step_id: str
    kind: str
    executions: int


class StepStatsInfo(BaseModel):
    step_id: str
    failures: int = Field(description="Runs in which the step failed (Dagster STEP_FAILURE).")
    failed_and_continued: int = Field(description="Failures let through by continue_on_failure.")
    retries: int = Field(description="Attempts beyond the first, over all runs.")


class WorkflowStatsInfo(BaseModel):
    workflow: str
    executions: int
    by_status: dict[str, int]
    success_rate: float | None = Field(description="Succeeded of finished executions (0..1).")
    wall_p50_s: float | None
    wall_p95_s: float | None
    active_p50_s: float | None
    active_p95_s: float | None
    waiting: int
    waiting_on: list[WaitingOnInfo]
    steps: list[StepStatsInfo]
    runs: int


class WorkflowSummary(BaseModel):
    name: str
    description: str
    inputs: dict[str, Any] = Field(description="The typed inputs, by name (type, default, description).")
    triggers: list[str]
    steps: int
    api_launch: bool = Field(description="Whether POST /workflows/{name}/executions accepts it.")
    stats: WorkflowStatsInfo


class WorkflowList(BaseModel):
    workflows: list[WorkflowSummary]


class ExecutionList(BaseModel):
    workflow: str
    executions: list[ExecutionInfo]


class LaunchExecution(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: dict[str, Any] = Field(default_factory=dict, max_length=200, description="The workflow's inputs.")


class ExecutionLaunched(BaseModel):
    execution_id: str
    run_id: str
    status: str
    url: str = Field(description="The run in the Dagster UI.")


async def _specs(request: Request) -> dict[str, Any]:
    from orchestration.kernel.spec_errors import SpecError
    from orchestration.workflows.spec import load_workflows, workflow_files

    directory = request.app.state.settings.workflows_dir
    try:
        loaded = await anyio.to_thread.run_sync(lambda: load_workflows(workflow_files(directory)))
    except SpecError as exc:
        raise ProblemError(503, f"the workflow specs do not load: {exc}", slug="specs-invalid") from None
    return {spec.name: spec for spec in loaded.values()}


async def _spec(request: Request, name: str) -> Any:
    specs = await _specs(request)
    if name not in specs:
        raise ProblemError(404, f"no workflow named {name!r}", slug="not-found")
    return specs[name]


async def _report(request: Request, specs: dict[str, Any], tags: dict[str, str], limit: int) -> stats.Report:
    results = await runs_with_tags(request.app.state.dagster, tags, stats.RUN_FIELDS, limit)
    runs = stats.runs_from_graphql(results)
    step_types = {name: {step.id: step.type for step in spec.steps} for name, spec in specs.items()}
    return await anyio.to_thread.run_sync(lambda: stats.build_report(runs, step_types, workflows=list(specs)))


def _summary(spec: Any, workflow_stats: stats.WorkflowStats) -> WorkflowSummary:
    return WorkflowSummary(
        name=spec.name,
        description=spec.description,
        inputs={name: spec_input.model_dump(mode="json") for name, spec_input in spec.inputs.items()},
        triggers=[trigger.type for trigger in spec.triggers],
        steps=len(spec.steps),
        api_launch=accepts_api_launch(spec),
        stats=WorkflowStatsInfo.model_validate(workflow_stats.to_json()),
    )


@router.get("/workflows", response_model=WorkflowList, responses=problem_responses(401, 403, 422, 503))
async def list_workflows(
    request: Request,
    _: Annotated[Principal, Depends(requires("workflows:read", read_only=True))],
    limit: RunLimit = stats.DEFAULT_RUN_LIMIT,
):
    """Every workflow spec with its statistics by execution."""
    specs = await _specs(request)
    report = await _report(request, specs, {KIND_TAG: "workflow"}, limit)
    return WorkflowList(workflows=[_summary(specs[name], report.stats[name]) for name in sorted(specs)])


@router.get(
    "/workflows/{name}/stats",
    response_model=WorkflowStatsInfo,
    responses=problem_responses(401, 403, 404, 422, 503),
)
async def workflow_statistics(
    name: WorkflowName,
    request: Request,
    _: Annotated[Principal, Depends(requires("workflows:read:{name}", read_only=True))],
    limit: RunLimit = stats.DEFAULT_RUN_LIMIT,
):
    """One workflow's statistics by execution: outcomes, durations, waiting, step failures, retries."""
    spec = await _spec(request, name)
    report = await _report(request, {name: spec}, {WORKFLOW_TAG: name}, limit)
    return WorkflowStatsInfo.model_validate(report.stats[name].to_json())


@router.get(
    "/workflows/{name}/executions",
    response_model=ExecutionList,
    responses=problem_responses(401, 403, 404, 422, 503),
)
async def list_executions(
    name: WorkflowName,
    request: Request,
    _: Annotated[Principal, Depends(requires("workflows:read:{name}", read_only=True))],
    status: ExecutionStatus | None = Query(default=None, description="Only executions with this status."),
    limit: RunLimit = stats.DEFAULT_RUN_LIMIT,
):
    """The workflow's executions, newest first (all runs of one execution grouped)."""
    spec = await _spec(request, name)
    report = await _report(request, {name: spec}, {WORKFLOW_TAG: name}, limit)
    return ExecutionList(
        workflow=name,
        executions=[
            ExecutionInfo.model_validate(execution.to_json())
            for execution in report.executions[name]
            if status is None or execution.status == status
        ],
    )


@router.post(
    "/workflows/{name}/executions",
    response_model=ExecutionLaunched,
    status_code=201,
    responses=problem_responses(400, 401, 403, 404, 409, 413, 415, 422, 503),
)
async def launch_execution(
    name: WorkflowName,
    body: LaunchExecution,
    request: Request,
    principal: Annotated[Principal, Depends(requires("workflows:launch:{name}"))],
):
    """Start a new execution with `inputs` (checked against the workflow's typed inputs); its first
    run is queued in Dagster's run queue. 409 unless the spec declares the `api` trigger."""
    spec = await _spec(request, name)
    if not accepts_api_launch(spec):
        raise ProblemError(
            409,
            f"workflow {name!r} does not declare the 'api' trigger, so it cannot be launched through the API",
            title="Not launchable through the API",
            slug="no-api-trigger",
        )
    try:
        run_config = validated_inputs(spec, body.inputs)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**error, "loc": ("body", "inputs", *error["loc"])} for error in exc.errors()]
        ) from None
    locations = await repositories_with_job(request, name)
    if not locations:
        raise ProblemError(503, f"the job of workflow {name!r} is not loaded in Dagster", slug="not-loaded")
    execution_id = new_execution_id()
    run = await queue_run(
        request,
        principal,
        location=locations[0]["location"],
        repository=locations[0]["name"],
        job_name=name,
        run_config=run_config,
        tags=execution_tags(execution_id, launched_by="gateway"),
    )
    await record(
        "workflow.launch", principal, f"workflow:{name}", {"execution_id": execution_id, "run_id": run.run_id}
    )
    return ExecutionLaunched(
        execution_id=execution_id, run_id=run.run_id, status=run.status, url=ui_run_url(request, run.run_id)
    )
