"""The platform's own happenings reach `platform.runs` and `platform.assets`, once each."""

from __future__ import annotations

import dagster as dg
import pytest
from dagster._core.events import DagsterEventType

from resources.event_stream import EventStream, load_stream_specs
from sensors.platform_events import ASSETS_STREAM, RUNS_STREAM, platform_event_sensors, platform_run_sensors


@dg.asset(check_specs=[dg.AssetCheckSpec("positive", asset="daily_sales")])
def daily_sales():
    yield dg.Output(3)
    yield dg.AssetCheckResult(check_name="positive", passed=True)


@pytest.fixture
def platform_streams(event_stream: EventStream, monkeypatch) -> EventStream:
    """The shipped declarations of the platform streams, on each backend."""
    for spec in load_stream_specs().values():
        event_stream.registry.upsert(spec)
    monkeypatch.setattr(type(event_stream), "close", lambda self: None)  # shared with the sensors
    return event_stream


@pytest.fixture
def instance():
    with dg.instance_for_test() as test_instance:
        yield test_instance


def run_ended(sensor: dg.SensorDefinition, instance, result) -> None:
    """Evaluate a run status sensor for the run's success event, as its tick would."""
    run = instance.get_run_by_id(result.run_id)
    (success,) = instance.get_records_for_run(result.run_id, of_type=DagsterEventType.RUN_SUCCESS).records
    context = dg.build_run_status_sensor_context(
        sensor_name=sensor.name,
        dagster_event=success.event_log_entry.dagster_event,
        dagster_instance=instance,
        dagster_run=run,
    )
    sensor(context)


def succeeded_sensor(events: EventStream) -> dg.SensorDefinition:
    return next(
        s for s in platform_run_sensors(lambda: events) if s.name == "platform_runs_succeeded_to_stream"
    )


def test_run_status_changes_are_published_once(platform_streams, instance):
    result = dg.materialize([daily_sales], instance=instance, tags={"team": "sales"})
    sensor = succeeded_sensor(platform_streams)
    run_ended(sensor, instance, result)
    run_ended(sensor, instance, result)  # evaluated again for the same run (a lost cursor)
    (event,) = platform_streams.read(RUNS_STREAM)
    assert event.payload["run_id"] == result.run_id
    assert event.payload["status"] == "succeeded"
    assert event.payload["tags"]["team"] == "sales"
    assert {s.name for s in platform_event_sensors()} == {
        f"platform_runs_{label}_to_stream" for label in ("started", "succeeded", "failed", "canceled")
    }


def test_an_ended_runs_materializations_and_check_results_are_published_once(platform_streams, instance):
    result = dg.materialize([daily_sales], instance=instance)
    sensor = succeeded_sensor(platform_streams)
    run_ended(sensor, instance, result)
    run_ended(sensor, instance, result)
    published = platform_streams.read(ASSETS_STREAM)
    assert [(e.payload["kind"], e.payload["asset_key"]) for e in published] == [
        ("materialization", "daily_sales"),
        ("check", "daily_sales"),
    ]
    assert published[1].payload["check_name"] == "positive" and published[1].payload["passed"] is True
    assert {e.payload["run_id"] for e in published} == {result.run_id}
