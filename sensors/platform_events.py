"""Sensors publishing the platform's own happenings to streams external systems can subscribe to.

- `platform.runs`: one event per run status change (started, succeeded, failed, canceled), from
  Dagster's run status sensors (each keeps its own cursor over the event log).
- `platform.assets`: materializations and asset check results, read from the event log by storage id
  (the sensor's cursor).

Both streams are declared in `sensors/streams/`. Every event carries an idempotency key derived from
what happened (`run:{run_id}:{status}`, `event:{storage_id}`), so a tick that published and then died
before its cursor was saved publishes duplicates that the stream reports and does not store.
A backend that cannot be reached fails the tick; the cursor stays, and the next tick retries.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import dagster as dg
from dagster._core.events import DagsterEventType
from dagster._core.storage.event_log.base import EventRecordsFilter

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
ASSET_EVENTS_PER_TICK = 500


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


def platform_run_sensors(
    open_events: Callable[[], EventStream] = _default_open,
    *,
    default_status: dg.DefaultSensorStatus = dg.DefaultSensorStatus.STOPPED,
    minimum_interval_seconds: int = 30,
) -> list[dg.SensorDefinition]:
    """One run status sensor per published status, each publishing to `platform.runs`."""
    sensors = []
    for run_status, label in PUBLISHED_RUN_STATUSES.items():

        def publish_status(context: dg.RunStatusSensorContext, label: str = label) -> None:
            payload = run_status_payload(context.dagster_run, label, context.dagster_event.timestamp)
            with open_events() as events:
                result = events.publish(
                    RUNS_STREAM, payload, idempotency_key=f"run:{context.dagster_run.run_id}:{label}"
                )
            if result.status == "rejected":
                raise dg.Failure(
                    f"{RUNS_STREAM} rejected the event of run {payload['run_id']}: {result.reason}"
                )

        sensors.append(
            dg.run_status_sensor(
                run_status=run_status,
                name=f"platform_runs_{label}_to_stream",
                description=f"Publishes every run that {label} to the stream {RUNS_STREAM!r}.",
                monitor_all_code_locations=True,
                default_status=default_status,
                minimum_interval_seconds=minimum_interval_seconds,
            )(publish_status)
        )
    return sensors


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


def asset_event_records(instance: dg.DagsterInstance, after_storage_id: int, limit: int) -> list:
    """The next `limit` materializations and check evaluations after the storage id, oldest first."""
    records = []
    with warnings.catch_warnings():
        # Dagster points to per-asset fetchers; this sensor follows every asset, which only the
        # event-type filter does.
        warnings.simplefilter("ignore")
        for event_type in ASSET_EVENT_TYPES:
            records.extend(
                instance.get_event_records(
                    EventRecordsFilter(event_type=event_type, after_cursor=after_storage_id),
                    limit=limit,
                    ascending=True,
                )
            )
    return sorted(records, key=lambda record: record.storage_id)[:limit]


def platform_assets_sensor(
    open_events: Callable[[], EventStream] = _default_open,
    *,
    default_status: dg.DefaultSensorStatus = dg.DefaultSensorStatus.STOPPED,
    minimum_interval_seconds: int = 30,
    events_per_tick: int = ASSET_EVENTS_PER_TICK,
) -> dg.SensorDefinition:
    """Publish materializations and check results to `platform.assets`, paging by storage id."""

    @dg.sensor(
        name="platform_assets_to_stream",
        description=f"Publishes materializations and asset check results to the stream {ASSETS_STREAM!r}.",
        default_status=default_status,
        minimum_interval_seconds=minimum_interval_seconds,
    )
    def publish_asset_events(context: dg.SensorEvaluationContext) -> dg.SkipReason | None:
        after = json.loads(context.cursor)["after_storage_id"] if context.cursor else 0
        records = asset_event_records(context.instance, after, events_per_tick)
        if not records:
            return dg.SkipReason("no new materializations or check results")
        batch = [
            EventToPublish(asset_event_payload(record), idempotency_key=f"event:{record.storage_id}")
            for record in records
        ]
        with open_events() as events:
            result = events.publish_batch(ASSETS_STREAM, batch)
        if result.rejected:
            reasons = "; ".join(f"#{item.index}: {item.reason}" for item in result.rejected)
            raise dg.Failure(f"{ASSETS_STREAM} rejected events: {reasons}")
        context.update_cursor(json.dumps({"after_storage_id": records[-1].storage_id}))
        return None

    return publish_asset_events


def platform_event_sensors(
    open_events: Callable[[], EventStream] = _default_open,
) -> list[dg.SensorDefinition]:
    """Every sensor publishing platform happenings (stopped until switched on in the UI)."""
    return [*platform_run_sensors(open_events), platform_assets_sensor(open_events)]
