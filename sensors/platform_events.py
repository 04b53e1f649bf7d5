"""Sensors publishing the platform's own happenings to streams external systems can subscribe to.

Dagster's run status sensors (one per status, each with its own cursor over the event log) publish:
- to `platform.runs`, one event per run status change (started, succeeded, failed, canceled);
- to `platform.assets`, when a run ends (whatever its outcome), the materializations and asset check
  results it recorded. They are read per run because Dagster's default SQLite event log is sharded by
  run and has no cross-run cursor over every asset; events reported outside any run are not published.

Both streams are declared in `sensors/streams/`. Every event carries an idempotency key derived from
what happened (`run:{run_id}:{status}`, `event:{run_id}:{storage_id}`), so a tick that published and
then died before its cursor was saved publishes duplicates that the stream reports and does not store.
A backend that cannot be reached fails the tick, and Dagster evaluates the run again on the next one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import dagster as dg
from dagster._core.events import DagsterEventType

from resources.event_stream import EventStream, EventToPublish

RUNS_STREAM = "platform.runs"
ASSETS_STREAM = "platform.assets"
PUBLISHED_RUN_STATUSES = {
    dg.DagsterRunStatus.STARTED: "started",
    dg.DagsterRunStatus.SUCCESS: "succeeded",
    dg.DagsterRunStatus.FAILURE: "failed",
    dg.DagsterRunStatus.CANCELED: "canceled",
}
ASSET_EVENT_TYPES = (DagsterEventType.ASSET_MATERIALIZATION, DagsterEventType.ASSET_CHECK_EVALUATION)
PUBLISH_PAGE = 500


def _default_open() -> EventStream:
    from resources.event_stream import open_event_stream

    return open_event_stream()


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat()


def run_status_payload(run: dg.DagsterRun, status: str, timestamp: float) -> dict[str, Any]:
    # System tags (dagster/...) are kept: they say which sensor or schedule launched the run.
    return {
        "run_id": run.run_id,
        "job_name": run.job_name,
        "status": status,
        "occurred_at": _iso(timestamp),
        "tags": dict(run.tags),
    }


def status_time(instance: dg.DagsterInstance, run_id: str, label: str) -> float:
    """When the run started or ended, from its run record (the sensor's event carries no time)."""
    record = instance.get_run_record_by_id(run_id)
    moment = None
    if record is not None:
        moment = record.start_time if label == "started" else record.end_time
    return moment or time.time()


def platform_run_sensors(
    open_events: Callable[[], EventStream] = _default_open,
    *,
    default_status: dg.DefaultSensorStatus = dg.DefaultSensorStatus.STOPPED,
    minimum_interval_seconds: int = 30,
) -> list[dg.SensorDefinition]:
    """One run status sensor per published status; those of ended runs also publish asset events."""
    sensors = []
    for run_status, label in PUBLISHED_RUN_STATUSES.items():

        def publish_status(context: dg.RunStatusSensorContext, label: str = label) -> None:
            run = context.dagster_run
            payload = run_status_payload(run, label, status_time(context.instance, run.run_id, label))
            with open_events() as events:
                if label != "started":
                    publish_checked(events, ASSETS_STREAM, run_asset_events(context.instance, run.run_id))
                publish_checked(
                    events,
                    RUNS_STREAM,
                    [EventToPublish(payload, idempotency_key=f"run:{run.run_id}:{label}")],
                )

        sensors.append(
            dg.run_status_sensor(
                run_status=run_status,
                name=f"platform_runs_{label}_to_stream",
                description=f"Publishes every run that {label} to {RUNS_STREAM!r}"
                + ("." if label == "started" else f", and its asset events to {ASSETS_STREAM!r}."),
                monitor_all_code_locations=True,
                default_status=default_status,
                minimum_interval_seconds=minimum_interval_seconds,
            )(publish_status)
        )
    return sensors


def publish_checked(events: EventStream, stream: str, batch: list[EventToPublish]) -> None:
    """Publish in pages; a rejected event fails the tick (the declared schema and the sensor disagree)."""
    for start in range(0, len(batch), PUBLISH_PAGE):
        result = events.publish_batch(stream, batch[start : start + PUBLISH_PAGE])
        if result.rejected:
            reasons = "; ".join(f"#{start + item.index}: {item.reason}" for item in result.rejected)
            raise dg.Failure(f"{stream} rejected events: {reasons}")


def asset_event_payload(record) -> dict[str, Any]:
    event = record.event_log_entry.dagster_event
    common = {"run_id": record.run_id, "occurred_at": _iso(record.timestamp)}
    if event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
        materialization = event.step_materialization_data.materialization
        return {
            "kind": "materialization",
            "asset_key": materialization.asset_key.to_user_string(),
            "partition": materialization.partition,
            **common,
        }
    evaluation = event.asset_check_evaluation_data
    return {
        "kind": "check",
        "asset_key": evaluation.asset_key.to_user_string(),
        "check_name": evaluation.check_name,
        "passed": evaluation.passed,
        "severity": evaluation.severity.value,
        "partition": evaluation.partition,
        **common,
    }


def run_asset_events(instance: dg.DagsterInstance, run_id: str) -> list[EventToPublish]:
    """The run's materializations and check results, oldest first, keyed by their storage ids."""
    batch: list[EventToPublish] = []
    cursor = None
    while True:
        connection = instance.get_records_for_run(
            run_id, cursor=cursor, of_type=set(ASSET_EVENT_TYPES), limit=PUBLISH_PAGE
        )
        batch += [
            EventToPublish(asset_event_payload(record), idempotency_key=f"event:{run_id}:{record.storage_id}")
            for record in connection.records
        ]
        if not connection.has_more:
            return batch
        cursor = connection.cursor


def platform_event_sensors(
    open_events: Callable[[], EventStream] = _default_open,
) -> list[dg.SensorDefinition]:
    """Every sensor publishing platform happenings (stopped until switched on in the UI)."""
    return platform_run_sensors(open_events)
