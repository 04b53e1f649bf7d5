"""Jobs and assets: list them with their latest run, launch runs, materialize asset selections."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from orchestration.gateway.api.common import record, timestamp, ui_run_url
from orchestration.gateway.dagster_client import (
    ACTOR_TAG,
    VIA_TAG,
    DagsterRequestError,
    launch_run,
    workspace_repositories,
)
from orchestration.gateway.problems import ProblemError, problem_responses
from orchestration.gateway.security import requires
from orchestration.kernel.principals import Principal

router = APIRouter(tags=["jobs"])

ASSET_JOB_PREFIX = "__ASSET_JOB"


class RunBrief(BaseModel):
    run_id: str
    status: str
    started_at: datetime | None = None
    ended_at: datetime | None = None

    @classmethod
    def from_graphql(cls, run: dict[str, Any] | None) -> RunBrief | None:
        """From a GraphQL run with runId, status, startTime and endTime (None stays None)."""
        if run is None:
            return None
        return cls(
            run_id=run["runId"],
            status=run["status"],
            started_at=timestamp(run["startTime"]),
            ended_at=timestamp(run["endTime"]),
        )


class JobSummary(BaseModel):
    name: str
    location: str
    repository: str
    description: str | None = None
    latest_run: RunBrief | None = None


class AssetGroupSummary(BaseModel):
    name: str
    location: str
    repository: str
    assets: list[str]


class JobsPage(BaseModel):
    jobs: list[JobSummary]
    asset_groups: list[AssetGroupSummary]


class LaunchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run_config: dict[str, Any] = Field(
        default_factory=dict, description="Dagster run config (as in the launchpad)."
    )
    tags: dict[str, Annotated[str, Field(max_length=4096)]] = Field(default_factory=dict, max_length=50)
    location: str | None = Field(default=None, description="Code location, when a job name is ambiguous.")


class MaterializeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    assets: list[Annotated[str, Field(min_length=1, max_length=500)]] = Field(
        min_length=1,
        max_length=1000,
        description="Asset keys, path parts joined by '/' (e.g. 'sales/orders').",
    )
    tags: dict[str, Annotated[str, Field(max_length=4096)]] = Field(default_factory=dict, max_length=50)


class RunLaunched(BaseModel):
    run_id: str
    status: str
    url: str = Field(description="The run in the Dagster UI.")


def run_tags(principal: Principal, requested: dict[str, str]) -> dict[str, str]:
    return {**requested, ACTOR_TAG: principal.name, VIA_TAG: "gateway"}


@router.get("/jobs", response_model=JobsPage, responses=problem_responses(401, 403, 503))
async def list_jobs(
    request: Request, _: Annotated[Principal, Depends(requires("runs:read", read_only=True))]
):
    """Jobs and asset groups of every loaded code location, with each job's latest run."""
    jobs, groups = [], []
    for repository in await workspace_repositories(request.app.state.dagster):
        for job in repository["jobs"]:
            if job["name"].startswith(ASSET_JOB_PREFIX):
                continue
            latest = job["runs"][0] if job["runs"] else None
            jobs.append(
                JobSummary(
                    name=job["name"],
                    location=repository["location"],
                    repository=repository["name"],
                    description=job["description"],
                    latest_run=RunBrief.from_graphql(latest),
                )
            )
        for group in repository["assetGroups"]:
            groups.append(
                AssetGroupSummary(
                    name=group["groupName"],
                    location=repository["location"],
                    repository=repository["name"],
                    assets=sorted("/".join(key["path"]) for key in group["assetKeys"]),
                )
            )
    return JobsPage(jobs=jobs, asset_groups=groups)


async def repositories_with_job(request: Request, name: str, *, location: str | None = None) -> list[dict]:
    """The loaded repositories that define job `name` (in `location`, when given)."""
    return [
        repository
        for repository in await workspace_repositories(request.app.state.dagster)
        if any(job["name"] == name for job in repository["jobs"])
        and (location is None or repository["location"] == location)
    ]


@router.post(
    "/jobs/{name}/runs",
    response_model=RunLaunched,
    status_code=201,
    responses=problem_responses(400, 401, 403, 404, 409, 413, 415, 422, 503),
)
async def launch_job(
    name: str,
    body: LaunchRequest,
    request: Request,
    principal: Annotated[Principal, Depends(requires("runs:launch"))],
):
    """Queue a run of job `name`, tagged with the caller as its actor (like a launch from the UI)."""
    matches = await repositories_with_job(request, name, location=body.location)
    if not matches or name.startswith(ASSET_JOB_PREFIX):
        raise ProblemError(404, f"no job named {name!r}", slug="not-found")
    if len(matches) > 1:
        locations = ", ".join(sorted(repository["location"] for repository in matches))
        raise ProblemError(
            409, f"job {name!r} exists in several locations ({locations}): pass 'location'", slug="ambiguous"
        )
    repository = matches[0]
    run = await queue_run(
        request,
        principal,
        location=repository["location"],
        repository=repository["name"],
        job_name=name,
        run_config=body.run_config,
        tags=body.tags,
    )
    await record(
        "run.launch", principal, f"job:{name}", {"run_id": run.run_id, "location": repository["location"]}
    )
    return run


@router.post(
    "/assets/materializations",
    response_model=RunLaunched,
    status_code=201,
    responses=problem_responses(400, 401, 403, 404, 409, 413, 415, 422, 503),
)
async def materialize_assets(
    body: MaterializeRequest,
    request: Request,
    principal: Annotated[Principal, Depends(requires("runs:launch"))],
):
    """Queue one run materializing the selected assets (they must share a code location)."""
    wanted = list(dict.fromkeys(body.assets))
    owners: dict[tuple[str, str], set[str]] = {}
    for repository in await workspace_repositories(request.app.state.dagster):
        keys = {"/".join(key["path"]) for group in repository["assetGroups"] for key in group["assetKeys"]}
        found = keys.intersection(wanted)
        if found:
            owners[(repository["location"], repository["name"])] = found
    missing = set(wanted) - set().union(*owners.values()) if owners else set(wanted)
    if missing:
        raise ProblemError(
            404, f"no asset named {', '.join(sorted(missing))}", slug="not-found", field="body.assets"
        )
    if len(owners) > 1:
        raise ProblemError(
            409, "the selection spans several code locations: launch one per location", slug="ambiguous"
        )
    (location, repository_name) = next(iter(owners))
    run = await queue_run(
        request,
        principal,
        location=location,
        repository=repository_name,
        job_name=ASSET_JOB_PREFIX,
        run_config={},
        tags=body.tags,
        asset_selection=[key.split("/") for key in wanted],
    )
    await record("assets.materialize", principal, f"assets:{','.join(wanted)}", {"run_id": run.run_id})
    return run


def launch_refused(exc: DagsterRequestError) -> ProblemError:
    """The problem for Dagster refusing a launch: 422 invalid run config, 404 unknown job or
    selection, else 409."""
    if exc.kind == "RunConfigValidationInvalid":
        return ProblemError(
            422, str(exc), title="Invalid run config", slug="invalid-run-config", field="body.run_config"
        )
    if exc.kind in ("PipelineNotFoundError", "InvalidSubsetError"):
        return ProblemError(404, str(exc), slug="not-found")
    return ProblemError(409, str(exc), slug="launch-refused")


async def queue_run(request: Request, principal: Principal, **params: Any) -> RunLaunched:
    """Queue a run through Dagster's `launchRun` (the run queue), tagged with the caller as its
    actor; Dagster's refusals become problems."""
    tags = run_tags(principal, params.pop("tags"))
    try:
        launched = await launch_run(request.app.state.dagster, tags=tags, **params)
    except DagsterRequestError as exc:
        raise launch_refused(exc) from None
    return RunLaunched(
        run_id=launched["runId"], status=launched["status"], url=ui_run_url(request, launched["runId"])
    )
