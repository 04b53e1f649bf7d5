"""ETL pipelines and their quality reports, read from Dagster through GraphQL.

A pipeline is a staged asset tagged `junction/pipeline` (`assets/etl/factory.py`); its report history
is that asset's materializations (one per run that staged it) merged with the pipeline's finished runs
that staged nothing, and a run's report is built from the run's event log: both materializations, the
asset check evaluations and the failed steps' errors (`assets/etl/report.py`).
Dagster's event storage is the only source; nothing is copied into the platform store.

`GET .../reports/{run_id}` also answers a browser holding the link from the Dagster UI: that link
carries a permanent signed token for exactly that pipeline and run (`requires_or_signed_link`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field

from assets.etl.report import (
    PIPELINE_TAG,
    QUALITY_REPORT,
    REPORT_LINK_PURPOSE,
    UNSTAGED_STATUSES,
    CheckFact,
    HistoryRow,
    RunFacts,
    RunReport,
    StepFailure,
    is_pipeline_run,
    merge_history,
    render_history_html,
    render_report_html,
    staged_asset_name,
)
from orchestration.gateway.api.common import timestamp, ui_run_url
from orchestration.gateway.api.jobs import RunBrief
from orchestration.gateway.dagster_client import (
    asset_materializations,
    asset_node_tags,
    asset_nodes,
    latest_runs_by_tag,
    plain_metadata_entries,
    run_statuses,
    run_with_events,
    runs_by_tag,
)
from orchestration.gateway.problems import ProblemError, problem_responses
from orchestration.gateway.security import requires, requires_or_signed_link
from orchestration.kernel.principals import Principal

router = APIRouter(tags=["pipelines"])

PipelineName = Annotated[str, Path(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=200)]
RunId = Annotated[str, Path(pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")]
# The pages draw no script and load nothing from elsewhere: the charts are inline SVG with inline styles.
HTML_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'"
HTML_RESPONSE = {"text/html": {"schema": {"type": "string"}}}


class LastReport(BaseModel):
    run_id: str
    staged_at: datetime
    score_checks: float | None = Field(description="Share of the run's checks that passed.")
    score_rows: float | None = Field(description="Share of the rows meant to load that passed every check.")
    url: str


class PipelineSummary(BaseModel):
    name: str
    group: str
    target: str | None
    load_mode: str | None
    job: str
    last_run: RunBrief | None = Field(
        description="The newest run tagged with the pipeline (it may not have staged)."
    )
    last_report: LastReport | None = Field(description="The newest run that staged the pipeline.")


class PipelineList(BaseModel):
    pipelines: list[PipelineSummary]


class ReportHistory(BaseModel):
    pipeline: str
    reports: list[HistoryRow] = Field(
        description="One row per run that staged the pipeline or finished without staging, newest first."
    )
    next_cursor: str | None = Field(description="Pass as `before` for older runs; null on the last page.")


def wants_html(request: Request, *, default: bool) -> bool:
    """Content negotiation between HTML and JSON by the Accept header's q-values (ties: `default`)."""
    header = request.headers.get("accept", "")
    quality: dict[str, float] = {}
    for part in header.split(","):
        media_type, *parameters = (piece.strip() for piece in part.split(";"))
        q = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if media_type:
            quality[media_type.lower()] = max(q, quality.get(media_type.lower(), 0.0))
    wildcard = max(quality.get("*/*", 0.0), 0.0)
    html = quality.get("text/html", quality.get("text/*", wildcard))
    json_q = quality.get("application/json", quality.get("application/*", wildcard))
    if html == json_q:
        return default
    return html > json_q


def html_page(content: str) -> HTMLResponse:
    return HTMLResponse(content, headers={"content-security-policy": HTML_CSP})


async def _require_pipeline(request: Request, name: str) -> None:
    """404 unless a loaded code location defines the pipeline's staged asset."""
    tags = await asset_node_tags(request.app.state.dagster, [staged_asset_name(name)])
    if tags is None or tags.get(PIPELINE_TAG) != name:
        raise ProblemError(404, f"no pipeline {name}", slug="not-found")


def _pipeline_of(node: dict[str, Any]) -> str | None:
    return next((tag["value"] for tag in node["tags"] if tag["key"] == PIPELINE_TAG), None)


def _report_link(request: Request, name: str, run_id: str) -> str:
    return str(request.url_for("pipeline_report", name=name, run_id=run_id))


@router.get("/pipelines", response_model=PipelineList, responses=problem_responses(401, 403, 503))
async def list_pipelines(
    request: Request, _: Annotated[Principal, Depends(requires("pipelines:read", read_only=True))]
):
    """Every ETL pipeline with its target, its newest run and its newest quality score."""
    client = request.app.state.dagster
    nodes = {
        name: node
        for node in await asset_nodes(client)
        if (name := _pipeline_of(node)) is not None and node["assetKey"]["path"] == [staged_asset_name(name)]
    }
    latest_runs = await latest_runs_by_tag(client, PIPELINE_TAG, sorted(nodes))
    pipelines = []
    for name, node in sorted(nodes.items()):
        definition = plain_metadata_entries(node["metadataEntries"])
        latest = node["assetMaterializations"][0] if node["assetMaterializations"] else None
        staged = plain_metadata_entries(latest["metadataEntries"]) if latest else {}
        pipelines.append(
            PipelineSummary(
                name=name,
                group=node["groupName"],
                target=definition.get("target"),
                load_mode=definition.get("load_mode"),
                job=f"{name}_pipeline",
                last_run=RunBrief.from_graphql(latest_runs.get(name)),
                last_report=LastReport(
                    run_id=latest["runId"],
                    staged_at=timestamp(int(latest["timestamp"]) / 1000),
                    score_checks=staged.get("quality_score_checks"),
                    score_rows=staged.get("quality_score_rows"),
                    url=_report_link(request, name, latest["runId"]),
                )
                if latest
                else None,
            )
        )
    return PipelineList(pipelines=pipelines)


@router.get(
    "/pipelines/{name}/reports",
    response_model=ReportHistory,
    responses={200: {"content": HTML_RESPONSE}, **problem_responses(401, 403, 404, 422, 503)},
)
async def report_history(
    name: PipelineName,
    request: Request,
    _: Annotated[Principal, Depends(requires("pipelines:read", read_only=True))],
    limit: Annotated[int, Query(ge=1, le=100, description="Runs per page.")] = 20,
    before: Annotated[
        str | None, Query(pattern=r"^[0-9]{1,16}$", description="The `next_cursor` of the previous page.")
    ] = None,
):
    """One row per run that staged the pipeline, and per finished run of it that staged nothing (its
    failed step and error, every figure null), newest first; an HTML page with the score chart when
    the client accepts text/html."""
    await _require_pipeline(request, name)
    client = request.app.state.dagster
    # One more than the page tells whether there is a next page; one more again gives the last row's
    # predecessor, whose schema tells whether that row's schema changed.
    materializations = await asset_materializations(
        client, [staged_asset_name(name)], limit=limit + 2, before_ms=before
    )
    statuses = await run_statuses(client, [m["runId"] for m in materializations[: limit + 1]])
    metadata = [plain_metadata_entries(m["metadataEntries"]) for m in materializations]
    staged = [
        (
            int(materialization["timestamp"]),
            HistoryRow.from_metadata(
                materialization["runId"],
                statuses.get(materialization["runId"], {}).get("status"),
                int(materialization["timestamp"]) / 1000,
                metadata[index],
                metadata[index + 1].get("dagster/column_schema") if index + 1 < len(metadata) else None,
            ),
        )
        for index, materialization in enumerate(materializations[: limit + 1])
    ]
    rows, next_key = merge_history(staged, await _unstaged_rows(client, name, limit, before), limit)
    next_cursor = None if next_key is None else str(int(next_key))
    for row in rows:
        row.url = _report_link(request, name, row.run_id)
    if wants_html(request, default=False):
        older = str(request.url.include_query_params(before=next_cursor)) if next_cursor else None
        return html_page(render_history_html(name, rows, older=older))
    return ReportHistory(pipeline=name, reports=rows, next_cursor=next_cursor)


async def _unstaged_rows(client, name: str, limit: int, before: str | None) -> list[tuple[float, HistoryRow]]:
    """Up to `limit` + 1 finished runs of the pipeline created before `before` (ms) that staged
    nothing, keyed by their creation time in ms, with their first failure."""
    staged_path = [staged_asset_name(name)]
    rows: list[tuple[float, HistoryRow]] = []
    cursor = None
    while len(rows) <= limit:
        page = await runs_by_tag(
            client,
            PIPELINE_TAG,
            name,
            statuses=list(UNSTAGED_STATUSES),
            created_before_s=int(before) / 1000 if before else None,
            limit=limit + 1,
            cursor=cursor,
        )
        for run in page:
            if any(m["assetKey"]["path"] == staged_path for m in run["assetMaterializations"]):
                continue  # its staged materialization is a row of its own
            events = await run_with_events(client, run["runId"])
            failures = _failures(events["events"]) if events else []
            row = HistoryRow.of_unstaged_run(run["runId"], run["status"], run["endTime"], failures)
            rows.append((run["creationTime"] * 1000, row))
        if len(page) <= limit:
            break
        cursor = page[-1]["runId"]
    return rows


@router.get(
    "/pipelines/{name}/reports/{run_id}",
    name="pipeline_report",
    response_model=RunReport,
    responses={200: {"content": HTML_RESPONSE}, **problem_responses(401, 403, 404, 422, 503)},
)
async def pipeline_report(
    name: PipelineName,
    run_id: RunId,
    request: Request,
    _: Annotated[
        Principal,
        Depends(
            requires_or_signed_link(
                "pipelines:read", REPORT_LINK_PURPOSE, {"pipeline": "name", "run_id": "run_id"}
            )
        ),
    ],
):
    """The quality report of one run: an HTML page with charts, or JSON with `Accept: application/json`.

    Open with an API key (scope `pipelines:read`) or with the `token` of the link in the run's
    materialization metadata in the Dagster UI, which is valid for this pipeline and run only."""
    client = request.app.state.dagster
    await _require_pipeline(request, name)
    run = await run_with_events(client, run_id)
    if run is None:
        raise ProblemError(404, f"no run {run_id}", slug="not-found")
    facts = await _facts(client, name, run)
    if facts is None:
        raise ProblemError(404, f"run {run_id} is not a run of pipeline {name}", slug="not-found")
    report = RunReport.from_facts(facts)
    report.links["run in the Dagster UI"] = ui_run_url(request, run_id)
    if wants_html(request, default=True):
        return html_page(render_report_html(report))
    return report


async def _facts(client, name: str, run: dict[str, Any]) -> RunFacts | None:
    staged_name = staged_asset_name(name)
    materializations = {
        tuple(event["assetKey"]["path"]): event
        for event in run["events"]
        if event["__typename"] == "MaterializationEvent"
    }
    staged_event = materializations.get((staged_name,))
    tags = {tag["key"]: tag["value"] for tag in run["tags"]}
    failures = _failures(run["events"])
    selected = [key["path"] for key in run["assetSelection"] or []]
    if staged_event is None and not is_pipeline_run(
        name, run["jobName"], tags, selected, [failure.step for failure in failures]
    ):
        return None
    published_event = materializations.get((name,))
    checks = []
    for event in run["events"]:
        if event["__typename"] != "AssetCheckEvaluationEvent":
            continue
        evaluation = event["evaluation"]
        if evaluation["assetKey"]["path"] != [staged_name]:
            continue
        metadata = plain_metadata_entries(evaluation["metadataEntries"])
        checks.append(
            CheckFact(
                name=evaluation["checkName"],
                passed=evaluation["success"],
                severity=evaluation["severity"],
                blocking=metadata.pop("blocking", None),
                description=evaluation["description"],
                metadata=metadata,
            )
        )
    previous_columns, staged = None, None
    if staged_event is not None:
        previous = await asset_materializations(
            client, [staged_name], limit=1, before_ms=staged_event["timestamp"]
        )
        if previous:
            previous_columns = plain_metadata_entries(previous[0]["metadataEntries"]).get(
                "dagster/column_schema"
            )
        staged = plain_metadata_entries(staged_event["metadataEntries"])
        staged.pop(QUALITY_REPORT, None)  # the page is the report: its own link (and token) is not repeated
    return RunFacts(
        pipeline=name,
        run_id=run["runId"],
        status=run["status"],
        started_at=run["startTime"],
        ended_at=run["endTime"],
        staged_at=int(staged_event["timestamp"]) / 1000 if staged_event else None,
        staged=staged,
        published=plain_metadata_entries(published_event["metadataEntries"]) if published_event else None,
        checks=checks,
        previous_columns=previous_columns,
        failures=failures,
    )


def _failures(events: list[dict[str, Any]]) -> list[StepFailure]:
    """The failed steps with their errors, as `report.failures_from_instance` reads them; the run's own
    failure only when no step failed."""
    steps, run_failures = [], []
    for event in events:
        kind = event["__typename"]
        if kind not in ("ExecutionStepFailureEvent", "RunFailureEvent"):
            continue
        error = event.get("error")
        chain = (
            [(error["className"], error["message"])]
            + [(c["className"], c["message"]) for c in error["causes"]]
            if error
            else [(None, event["message"])]
        )
        if kind == "RunFailureEvent":
            run_failures.append(StepFailure.from_error(None, chain))
            continue
        failure = event.get("failureMetadata")
        steps.append(
            StepFailure.from_error(
                event["stepKey"],
                chain,
                description=failure["description"] if failure else None,
                metadata=plain_metadata_entries(failure["metadataEntries"]) if failure else None,
            )
        )
    return steps or run_failures
