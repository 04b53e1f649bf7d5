"""An async client for Dagster's webserver (GraphQL and /server_info).

The gateway never calls Dagster's synchronous `DagsterGraphQLClient`: inside an async handler it
would block the event loop. In the combined server the client talks to the in-process Dagster app
through an ASGI transport (no socket, no second process); the standalone gateway talks HTTP to
JUNCTION_DAGSTER_URL. Either way, runs launched through it are queued and tagged exactly like runs
launched from the UI.
"""

from __future__ import annotations

from typing import Any

import httpx

# Who launched a run and through what (`gateway`, `cli`): tags of every run launched through this client.
ACTOR_TAG = "junction/actor"
VIA_TAG = "junction/via"


class DagsterUnavailable(Exception):
    """Dagster's webserver could not be reached or answered with a server error."""


class DagsterClient:
    def __init__(
        self, base_url: str, transport: httpx.AsyncBaseTransport | None = None, timeout_s: float = 10.0
    ):
        self.base_url = base_url.rstrip("/")
        self._client = httpx.AsyncClient(base_url=self.base_url, transport=transport, timeout=timeout_s)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise DagsterUnavailable(f"Dagster at {self.base_url} is unreachable: {exc}") from exc
        if response.status_code >= 500:
            raise DagsterUnavailable(f"Dagster at {self.base_url} answered {response.status_code}")
        return response

    async def server_info(self) -> dict[str, Any]:
        response = await self._request("GET", "/server_info")
        response.raise_for_status()
        return response.json()

    async def graphql(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run a GraphQL operation; GraphQL-level errors raise, with Dagster's messages."""
        response = await self._request(
            "POST", "/graphql", json={"query": query, "variables": variables or {}}
        )
        payload = response.json()
        if payload.get("errors"):
            messages = "; ".join(error.get("message", "?") for error in payload["errors"])
            raise DagsterUnavailable(f"Dagster GraphQL error: {messages}")
        return payload["data"]


class DagsterRequestError(Exception):
    """Dagster refused the request (unknown job, invalid run config, run already finished...)."""

    def __init__(self, kind: str, message: str, errors: list[str] | None = None):
        super().__init__(message)
        self.kind = kind
        self.errors = errors or []


WORKSPACE_JOBS_QUERY = """
query WorkspaceJobs {
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        locationOrLoadError {
          __typename
          ... on RepositoryLocation {
            repositories {
              name
              jobs { name description isAssetJob runs(limit: 1) { runId status startTime endTime } }
              assetGroups { groupName assetKeys { path } }
            }
          }
          ... on PythonError { message }
        }
      }
    }
    ... on PythonError { message }
  }
}
"""

LAUNCH_RUN_MUTATION = """
mutation LaunchRun($executionParams: ExecutionParams!) {
  launchRun(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId status } }
    ... on RunConfigValidationInvalid { errors { message path } }
    ... on PipelineNotFoundError { message }
    ... on InvalidSubsetError { message }
    ... on RunConflict { message }
    ... on PythonError { message }
    ... on UnauthorizedError { message }
    ... on InvalidStepError { invalidStepKey }
    ... on InvalidOutputError { stepKey invalidOutputName }
    ... on ConflictingExecutionParamsError { message }
    ... on PresetNotFoundError { message }
    ... on NoModeProvidedError { message }
  }
}
"""

RUN_QUERY = """
query Run($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run {
      runId jobName status creationTime startTime endTime canTerminate
      tags { key value }
      assetSelection { path }
      stepStats { stepKey status startTime endTime attempts { startTime } }
    }
    ... on RunNotFoundError { message }
    ... on PythonError { message }
  }
}
"""

TERMINATE_RUN_MUTATION = """
mutation Terminate($runId: String!) {
  terminateRun(runId: $runId) {
    __typename
    ... on TerminateRunSuccess { run { runId status } }
    ... on TerminateRunFailure { message run { status } }
    ... on RunNotFoundError { message }
    ... on UnauthorizedError { message }
    ... on PythonError { message }
  }
}
"""


async def workspace_repositories(client: DagsterClient) -> list[dict[str, Any]]:
    """Every loaded repository with its location name, jobs and asset groups."""
    data = await client.graphql(WORKSPACE_JOBS_QUERY)
    workspace = data["workspaceOrError"]
    if workspace["__typename"] != "Workspace":
        raise DagsterUnavailable(workspace.get("message", "workspace unavailable"))
    repositories = []
    for entry in workspace["locationEntries"]:
        location = entry["locationOrLoadError"]
        if not location or location["__typename"] != "RepositoryLocation":
            continue
        for repository in location["repositories"]:
            repositories.append({**repository, "location": entry["name"]})
    return repositories


async def launch_run(
    client: DagsterClient,
    *,
    location: str,
    repository: str,
    job_name: str,
    run_config: dict[str, Any],
    tags: dict[str, str],
    asset_selection: list[list[str]] | None = None,
) -> dict[str, Any]:
    selector: dict[str, Any] = {
        "repositoryLocationName": location,
        "repositoryName": repository,
        "jobName": job_name,
    }
    if asset_selection is not None:
        selector["assetSelection"] = [{"path": path} for path in asset_selection]
    params = {
        "selector": selector,
        "runConfigData": run_config,
        "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in sorted(tags.items())]},
    }
    result = (await client.graphql(LAUNCH_RUN_MUTATION, {"executionParams": params}))["launchRun"]
    kind = result["__typename"]
    if kind == "LaunchRunSuccess":
        return result["run"]
    if kind == "RunConfigValidationInvalid":
        errors = [error["message"] for error in result["errors"]]
        raise DagsterRequestError(kind, "invalid run config: " + "; ".join(errors), errors)
    if kind == "PythonError":
        raise DagsterUnavailable(f"Dagster failed to launch the run: {result.get('message', '').strip()}")
    message = result.get("message") or f"{kind}: {result}"
    raise DagsterRequestError(kind, message)


async def get_run(client: DagsterClient, run_id: str) -> dict[str, Any] | None:
    result = (await client.graphql(RUN_QUERY, {"runId": run_id}))["runOrError"]
    if result["__typename"] == "RunNotFoundError":
        return None
    if result["__typename"] != "Run":
        raise DagsterUnavailable(result.get("message", "run lookup failed"))
    return result


async def terminate_run(client: DagsterClient, run_id: str) -> dict[str, Any]:
    result = (await client.graphql(TERMINATE_RUN_MUTATION, {"runId": run_id}))["terminateRun"]
    kind = result["__typename"]
    if kind == "TerminateRunSuccess":
        return result["run"]
    if kind in ("RunNotFoundError", "TerminateRunFailure", "UnauthorizedError"):
        raise DagsterRequestError(kind, result.get("message", kind))
    raise DagsterUnavailable(result.get("message", "terminate failed"))


# --- pipelines and their quality reports (assets/etl/report.py builds the report from these) ---------

METADATA_ENTRY_FRAGMENT = """
fragment Entry on MetadataEntry {
  __typename label
  ... on IntMetadataEntry { intValue intRepr }
  ... on FloatMetadataEntry { floatValue }
  ... on TextMetadataEntry { text }
  ... on JsonMetadataEntry { jsonString }
  ... on MarkdownMetadataEntry { mdStr }
  ... on UrlMetadataEntry { url }
  ... on BoolMetadataEntry { boolValue }
  ... on PathMetadataEntry { path }
  ... on TimestampMetadataEntry { timestamp }
  ... on TableSchemaMetadataEntry { schema { columns { name type } } }
}
"""

PIPELINE_ASSETS_QUERY = (
    """
query PipelineAssets {
  assetNodes {
    assetKey { path }
    groupName
    tags { key value }
    metadataEntries { ...Entry }
    assetMaterializations(limit: 1) { runId timestamp metadataEntries { ...Entry } }
  }
}
"""
    + METADATA_ENTRY_FRAGMENT
)

STAGED_MATERIALIZATIONS_QUERY = (
    """
query StagedMaterializations($assetKey: AssetKeyInput!, $before: String, $limit: Int) {
  assetOrError(assetKey: $assetKey) {
    __typename
    ... on Asset {
      assetMaterializations(beforeTimestampMillis: $before, limit: $limit) {
        runId timestamp metadataEntries { ...Entry }
      }
    }
  }
}
"""
    + METADATA_ENTRY_FRAGMENT
)

RUN_STATUSES_QUERY = """
query RunStatuses($runIds: [String]) {
  runsOrError(filter: {runIds: $runIds}) {
    __typename
    ... on Runs { results { runId status startTime endTime } }
    ... on InvalidPipelineRunsFilterError { message }
    ... on PythonError { message }
  }
}
"""

RUNS_QUERY_TEMPLATE = """
query Runs($filter: RunsFilter, $limit: Int) {
  runsOrError(filter: $filter, limit: $limit) {
    __typename
    ... on Runs { results { %s } }
    ... on InvalidPipelineRunsFilterError { message }
    ... on PythonError { message }
  }
}
"""

RUN_EVENTS_QUERY = (
    """
query RunReportEvents($runId: ID!, $after: String) {
  runOrError(runId: $runId) {
    __typename
    ... on Run {
      runId jobName status startTime endTime
      tags { key value }
      assetSelection { path }
      eventConnection(afterCursor: $after, limit: 1000) {
        cursor hasMore
        events {
          __typename
          ... on MaterializationEvent { assetKey { path } timestamp metadataEntries { ...Entry } }
          ... on AssetCheckEvaluationEvent {
            evaluation { checkName success severity description assetKey { path } metadataEntries { ...Entry } }
          }
          ... on ExecutionStepFailureEvent {
            stepKey message error { ...ErrorChain }
            failureMetadata { description metadataEntries { ...Entry } }
          }
          ... on RunFailureEvent { message error { ...ErrorChain } }
        }
      }
    }
    ... on RunNotFoundError { message }
    ... on PythonError { message }
  }
}
fragment ErrorChain on PythonError { className message causes { className message } }
"""
    + METADATA_ENTRY_FRAGMENT
)

FINISHED_RUNS_QUERY = """
query PipelineFinishedRuns($filter: RunsFilter, $cursor: String, $limit: Int) {
  runsOrError(filter: $filter, cursor: $cursor, limit: $limit) {
    __typename
    ... on Runs { results { runId status creationTime endTime assetMaterializations { assetKey { path } } } }
    ... on InvalidPipelineRunsFilterError { message }
    ... on PythonError { message }
  }
}
"""


def plain_metadata_entries(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """GraphQL metadata entries as plain values, as `assets.etl.report.plain_metadata` gives them."""
    import json

    plain: dict[str, Any] = {}
    for entry in entries:
        kind = entry["__typename"]
        if kind == "IntMetadataEntry":
            value = entry["intValue"] if entry["intValue"] is not None else int(entry["intRepr"])
        elif kind == "FloatMetadataEntry":
            value = entry["floatValue"]
        elif kind == "JsonMetadataEntry":
            value = json.loads(entry["jsonString"])
        elif kind == "TableSchemaMetadataEntry":
            value = [{"name": c["name"], "type": c["type"]} for c in entry["schema"]["columns"]]
        else:
            value = next(
                (
                    entry[name]
                    for name in ("text", "mdStr", "url", "boolValue", "path", "timestamp")
                    if name in entry
                ),
                None,
            )
        plain[entry["label"]] = value
    return plain


async def asset_nodes(client: DagsterClient) -> list[dict[str, Any]]:
    return (await client.graphql(PIPELINE_ASSETS_QUERY))["assetNodes"]


async def asset_materializations(
    client: DagsterClient, asset_path: list[str], *, limit: int, before_ms: str | None = None
) -> list[dict[str, Any]]:
    """An asset's materializations, newest first, before a timestamp (ms) when given."""
    data = await client.graphql(
        STAGED_MATERIALIZATIONS_QUERY, {"assetKey": {"path": asset_path}, "before": before_ms, "limit": limit}
    )
    asset = data["assetOrError"]
    return asset["assetMaterializations"] if asset["__typename"] == "Asset" else []


async def run_statuses(client: DagsterClient, run_ids: list[str]) -> dict[str, dict[str, Any]]:
    if not run_ids:
        return {}
    result = (await client.graphql(RUN_STATUSES_QUERY, {"runIds": run_ids}))["runsOrError"]
    if result["__typename"] != "Runs":
        raise DagsterUnavailable(result.get("message", "run lookup failed"))
    return {run["runId"]: run for run in result["results"]}


async def run_with_events(client: DagsterClient, run_id: str) -> dict[str, Any] | None:
    """A run with its materializations and asset check evaluations (every page of its event log)."""
    run: dict[str, Any] | None = None
    events: list[dict[str, Any]] = []
    after: str | None = None
    while True:
        result = (await client.graphql(RUN_EVENTS_QUERY, {"runId": run_id, "after": after}))["runOrError"]
        if result["__typename"] == "RunNotFoundError":
            return None
        if result["__typename"] != "Run":
            raise DagsterUnavailable(result.get("message", "run lookup failed"))
        run = run or result
        connection = result["eventConnection"]
        events.extend(event for event in connection["events"] if len(event) > 1)
        if not connection["hasMore"]:
            break
        after = connection["cursor"]
    return {**run, "events": events}


async def runs_by_tag(
    client: DagsterClient,
    key: str,
    value: str,
    *,
    statuses: list[str],
    created_before_s: float | None,
    limit: int,
    cursor: str | None = None,
) -> list[dict[str, Any]]:
    """Runs tagged `key=value` in `statuses`, created before a time (seconds) when given, newest first,
    with the asset keys each materialized; `cursor` is the last run id of the previous page."""
    run_filter: dict[str, Any] = {"tags": [{"key": key, "value": value}], "statuses": statuses}
    if created_before_s is not None:
        run_filter["createdBefore"] = created_before_s
    result = (
        await client.graphql(FINISHED_RUNS_QUERY, {"filter": run_filter, "cursor": cursor, "limit": limit})
    )["runsOrError"]
    if result["__typename"] != "Runs":
        raise DagsterUnavailable(result.get("message", "run lookup failed"))
    return result["results"]


async def latest_runs_by_tag(client: DagsterClient, key: str, values: list[str]) -> dict[str, dict[str, Any]]:
    """The newest run tagged `key=value` for each value, in one request (one aliased field each).

    A job's own `runs` field would miss runs launched outside a code location (`junction pipelines
    run` executes in process): those carry no repository tag, but they carry the job's tags.
    """
    if not values:
        return {}
    fields = "\n".join(
        f"  r{index}: runsOrError(filter: {{tags: [{{key: $key, value: $v{index}}}]}}, limit: 1) {{"
        " __typename ... on Runs { results { runId status startTime endTime } } ... on PythonError { message } }"
        for index in range(len(values))
    )
    declarations = ", ".join(["$key: String!", *(f"$v{index}: String!" for index in range(len(values)))])
    variables: dict[str, Any] = {"key": key, **{f"v{index}": value for index, value in enumerate(values)}}
    data = await client.graphql(f"query LatestRuns({declarations}) {{\n{fields}\n}}", variables)
    latest: dict[str, dict[str, Any]] = {}
    for index, value in enumerate(values):
        result = data[f"r{index}"]
        if result["__typename"] != "Runs":
            raise DagsterUnavailable(result.get("message", "run lookup failed"))
        if result["results"]:
            latest[value] = result["results"][0]
    return latest


ASSET_NODE_TAGS_QUERY = """
query AssetNodeTags($assetKey: AssetKeyInput!) {
  assetNodeOrError(assetKey: $assetKey) {
    __typename
    ... on AssetNode { tags { key value } }
  }
}
"""


async def asset_node_tags(client: DagsterClient, asset_path: list[str]) -> dict[str, str] | None:
    """The definition tags of an asset, or None when no loaded code location defines it."""
    node = (await client.graphql(ASSET_NODE_TAGS_QUERY, {"assetKey": {"path": asset_path}}))[
        "assetNodeOrError"
    ]
    if node["__typename"] != "AssetNode":
        return None
    return {tag["key"]: tag["value"] for tag in node["tags"]}


async def runs_with_tags(
    client: DagsterClient, tags: dict[str, str], fields: str, limit: int
) -> list[dict[str, Any]]:
    """The newest `limit` runs carrying all of `tags`, each with the GraphQL `fields` asked for."""
    variables = {"filter": {"tags": [{"key": k, "value": v} for k, v in tags.items()]}, "limit": limit}
    result = (await client.graphql(RUNS_QUERY_TEMPLATE % fields, variables))["runsOrError"]
    if result["__typename"] != "Runs":
        raise DagsterUnavailable(result.get("message", "run lookup failed"))
    return result["results"]
