"""Replays as new runs: a stream trigger's batches over `first`..`last` launched again, through
Dagster's GraphQL API (`launchRun`, so the runs go through the run queue like a launch from the UI).

One code path for `POST /gateway/v1/streams/{name}/replays` and `junction events replay --as-runs`:
both call `replay_as_runs` with a `DagsterClient` (in-process in the combined server, HTTP to
JUNCTION_DAGSTER_URL from the CLI) and differ only in who the actor is and where the call came from
(`via`: `gateway` or `cli`), which the runs' tags and the audit entry record.

The trigger is rebuilt from its sensor's metadata (`junction/trigger`), so a replay makes the batches
the sensor would make from `first`; each run's key is `replay:{replay_id}:{original key}`, and a run
already holding that key is reported (`launched: false`), not launched again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio.to_thread
from pydantic import BaseModel, Field

from orchestration.errors import JunctionError
from orchestration.gateway.dagster_client import (
    ACTOR_TAG,
    VIA_TAG,
    DagsterClient,
    DagsterUnavailable,
    launch_run,
)

if TYPE_CHECKING:
    from resources.event_stream import EventStream
    from sensors.event_triggers import StreamTrigger

MAX_REPLAY_RUNS = 100
# A replay id names the replay in its run keys; the same id again launches nothing new.
REPLAY_ID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
RUN_KEY_TAG = "dagster/run_key"
# The implicit asset job: an asset-selection trigger's runs launch it with the sensor's selection.
ASSET_JOB = "__ASSET_JOB"

TRIGGER_SENSORS_QUERY = """
query {
  repositoriesOrError {
    __typename
    ... on RepositoryConnection {
      nodes {
        name
        location { name }
        sensors {
          name
          targets { pipelineName }
          assetSelection { assetKeys { path } }
          metadataEntries { label ... on JsonMetadataEntry { jsonString } }
        }
      }
    }
    ... on PythonError { message }
  }
}
"""

RUNS_BY_TAGS_QUERY = """
query($filter: RunsFilter) {
  runsOrError(filter: $filter) { ... on Runs { results { runId status } } ... on PythonError { message } }
}
"""


def new_replay_id() -> str:
    """A fresh replay id (when the caller names none, every call re-runs)."""
    import uuid

    return uuid.uuid4().hex[:12]


class ReplayRefused(JunctionError):
    """The replay asked for cannot be made: `status` 404 (no such trigger) or 422 (wrong stream, not
    replayable, too many runs); `parameter` names the input at fault (`trigger`, `to`)."""

    def __init__(self, status: int, message: str, parameter: str):
        super().__init__(message)
        self.status = status
        self.parameter = parameter


class ReplayedRun(BaseModel):
    run_key: str
    run_id: str
    status: str
    launched: bool = Field(description="False when a run with this run key already existed.")
    first_id: str
    last_id: str
    count: int


class ReplayOutcome(BaseModel):
    stream: str
    trigger: str
    replay_id: str
    runs: list[ReplayedRun]

    @property
    def launched(self) -> int:
        return sum(run.launched for run in self.runs)

    @property
    def skipped(self) -> int:
        return len(self.runs) - self.launched


class TriggerLaunch(BaseModel):
    """A trigger rebuilt from its sensor, with where and how its runs are launched."""

    model_config = {"arbitrary_types_allowed": True}

    trigger: Any  # StreamTrigger
    location: str
    repository: str
    asset_selection: list[list[str]] | None


async def stream_triggers(client: DagsterClient, stream: str) -> dict[str, TriggerLaunch | str]:
    """Every stream trigger of the workspace by sensor name: for those listening on `stream`, its
    launch, or why it cannot be replayed; for the others, `stream:<the stream it listens on>`, so a
    caller naming the wrong trigger is told which stream it belongs to."""
    from sensors.event_triggers import TRIGGER_METADATA, StreamTrigger

    data = (await client.graphql(TRIGGER_SENSORS_QUERY))["repositoriesOrError"]
    if data["__typename"] != "RepositoryConnection":
        raise DagsterUnavailable(data.get("message", "the workspace is unavailable"))
    found: dict[str, TriggerLaunch | str] = {}
    for repository in data["nodes"]:
        for sensor in repository["sensors"]:
            entries = {e["label"]: e.get("jsonString") for e in sensor["metadataEntries"]}
            if not entries.get(TRIGGER_METADATA):
                continue
            metadata = json.loads(entries[TRIGGER_METADATA])
            name = sensor["name"]
            if metadata["stream"] != stream:
                found[name] = f"stream:{metadata['stream']}"
                continue
            launch = metadata.get("target") or {}
            if launch.get("kind") == "assets":
                job_name = ASSET_JOB
                selection = [key["path"] for key in (sensor.get("assetSelection") or {}).get("assetKeys", [])]
            elif launch.get("kind") in ("job", "workflow") and sensor["targets"]:
                job_name, selection = sensor["targets"][0]["pipelineName"], None
            else:
                found[name] = "launches a target that cannot be replayed as runs"
                continue
            found[name] = TriggerLaunch(
                trigger=StreamTrigger.from_metadata(name, metadata, job_name),
                location=repository["location"]["name"],
                repository=repository["name"],
                asset_selection=selection,
            )
    return found


async def find_trigger(client: DagsterClient, stream: str, name: str | None) -> TriggerLaunch:
    """The trigger `name` of `stream`; without a name, the stream's only trigger."""
    found = await stream_triggers(client, stream)
    if name is None:
        mine = sorted(key for key, value in found.items() if isinstance(value, TriggerLaunch))
        if len(mine) == 1:
            return found[mine[0]]  # type: ignore[return-value]
        if not mine:
            raise ReplayRefused(404, f"no stream trigger listens on stream {stream!r}", "trigger")
        raise ReplayRefused(
            422, f"stream {stream!r} has several triggers; name one of {', '.join(mine)}", "trigger"
        )
    launch = found.get(name)
    if launch is None:
        raise ReplayRefused(404, f"no stream trigger named {name!r}", "trigger")
    if isinstance(launch, str):
        if launch.startswith("stream:"):
            other = launch.removeprefix("stream:")
            raise ReplayRefused(
                422, f"trigger {name!r} listens on stream {other!r}, not {stream!r}", "trigger"
            )
        raise ReplayRefused(422, f"trigger {name!r} {launch}", "trigger")
    return launch


async def replay_as_runs(
    client: DagsterClient,
    events: EventStream,
    *,
    stream: str,
    trigger: str | None,
    first_id: str,
    last_id: str,
    replay_id: str,
    actor: str,
    via: str,
    progress: Callable[[ReplayedRun], None] | None = None,
) -> ReplayOutcome:
    """Launch trigger `trigger`'s batches of `first_id`..`last_id` (inclusive ids) again as new runs,
    at most `MAX_REPLAY_RUNS`; runs already holding their replay key are reported, not relaunched.

    `progress` sees each run as it is launched or found. The call is audited (`events.replay`, by
    `actor`, origin `via`) with the runs launched so far, even when a launch fails part-way.
    Dagster's refusals raise `DagsterRequestError`, lost events `StreamSensorEventsLost`.
    """
    from orchestration.kernel import audit

    launch = await find_trigger(client, stream, trigger)
    chosen: StreamTrigger = launch.trigger
    requests = await anyio.to_thread.run_sync(
        lambda: chosen.replay_run_requests(events, first_id, last_id, replay_id)
    )
    if len(requests) > MAX_REPLAY_RUNS:
        raise ReplayRefused(
            422,
            f"the range makes {len(requests)} runs; replay at most {MAX_REPLAY_RUNS} per call (narrow it)",
            "to",
        )
    outcome = ReplayOutcome(stream=stream, trigger=chosen.name, replay_id=replay_id, runs=[])
    try:
        for run_request in requests:
            existing = await client.graphql(
                RUNS_BY_TAGS_QUERY,
                {"filter": {"tags": [{"key": RUN_KEY_TAG, "value": run_request.run_key}]}},
            )
            found = (existing["runsOrError"].get("results") or [None])[0]
            launched = found is None
            if launched:
                found = await launch_run(
                    client,
                    location=launch.location,
                    repository=launch.repository,
                    job_name=chosen.target.job.name,
                    run_config=run_request.run_config,
                    tags={
                        **run_request.tags,
                        RUN_KEY_TAG: run_request.run_key,
                        ACTOR_TAG: actor,
                        VIA_TAG: via,
                    },
                    asset_selection=launch.asset_selection,
                )
            run = ReplayedRun(
                run_key=run_request.run_key,
                run_id=found["runId"],
                status=found["status"],
                launched=launched,
                first_id=run_request.tags["junction/events_first"],
                last_id=run_request.tags["junction/events_last"],
                count=int(run_request.tags["junction/events_count"]),
            )
            outcome.runs.append(run)
            if progress is not None:
                progress(run)
    finally:
        details = {
            "trigger": chosen.name,
            "replay_id": replay_id,
            "from": first_id,
            "to": last_id,
            "runs": len(outcome.runs),
            "launched": outcome.launched,
        }
        if len(outcome.runs) < len(requests):
            details["unfinished"] = f"{len(requests) - len(outcome.runs)} run(s) not launched (failed)"
        await anyio.to_thread.run_sync(
            lambda: audit.append(
                "events.replay", actor=actor, target=f"stream:{stream}", origin=via, details=details
            )
        )
    return outcome
