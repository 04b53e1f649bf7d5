"""Parking: Delay and Approval end their run (SUCCESS, tagged waiting, no worker left), the resume
sensor starts the next run when due, completed steps are restored from the checkpoint, not re-run."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import dagster as dg
import psutil
import pytest
import workflow_scripts
from parking_harness import Clock, Parking, counted_step

from orchestration.workflows import parking
from orchestration.workflows.factory import workflow_definitions
from orchestration.workflows.resume import RESUME_SENSOR_NAME

DELAYED = {
    "name": "delayed",
    "inputs": {"wake": {"type": "string"}},
    "steps": [
        counted_step("before"),
        counted_step("beside"),
        {"id": "pause", "type": "delay", "depends_on": ["before"], "config": {"until": "{{ inputs.wake }}"}},
        counted_step("after", ["pause", "before"]),
    ],
}


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        yield test_instance


@pytest.fixture(autouse=True)
def no_calls_yet():
    workflow_scripts.CALLS.clear()


def test_a_delay_parks_and_the_sensor_resumes_it_after_the_time(store_url, instance):
    flow = Parking(instance, [DELAYED])
    wake = datetime.now(UTC) + timedelta(seconds=4)
    workers_before = len(psutil.Process().children(recursive=True))

    first = flow.start("delayed", wake=wake.isoformat())
    assert first.success
    tags = flow.run_tags(first)
    assert tags[parking.STATE_TAG] == parking.WAITING and tags[parking.PARKED_STEP_TAG] == "pause"
    execution_id = tags["junction/execution_id"]
    assert flow.step_statuses(first) == {
        "before": "SUCCESS",
        "beside": "SUCCESS",
        "pause": "SUCCESS",
        "after": "SKIPPED",
    }
    assert workflow_scripts.CALLS == ["before", "beside"]
    # Waiting is a row in the store, not a process.
    assert len(psutil.Process().children(recursive=True)) == workers_before
    checkpoint = parking.get_checkpoint(execution_id)
    assert checkpoint.state == parking.WAITING and checkpoint.wake_at == wake
    assert set(checkpoint.step_outputs) == {"before", "beside"}

    # A tick that ended before the wake-up time must ask for nothing. (On a machine loaded enough for
    # the first run to outlast the delay, no such tick is possible; the resume is checked all the same.)
    early = flow.tick()
    if datetime.now(UTC) < wake:
        assert early == [], "not due before its time"
    if not early:
        time.sleep(max(0.0, (wake - datetime.now(UTC)).total_seconds()) + 0.1)
        early = flow.tick()
    (request,) = early
    assert request.run_key == f"resume:{execution_id}:pause"
    assert request.job_name == "delayed" and request.run_config == {"wake": wake.isoformat()}
    assert request.tags == {
        "junction/execution_id": execution_id,
        parking.RESUMED_FROM_TAG: first.run_id,
        parking.RESUMED_STEP_TAG: "pause",
        "dagster/sensor_name": RESUME_SENSOR_NAME,
    }

    second = flow.launch(request)
    assert second.success
    assert flow.step_statuses(second) == {step: "SUCCESS" for step in ("before", "beside", "pause", "after")}
    # Completed steps were restored, not run again: only `after` called the script.
    assert workflow_scripts.CALLS == ["before", "beside", "after"]
    assert flow.output_metadata(second, "before")["restored"] == parking.RESTORED
    assert "restored" not in flow.output_metadata(second, "after")
    restored_before = second.output_for_node("after")["before"]["output"]
    assert restored_before["run"] == first.run_id, "the state saved by the first run"
    assert second.output_for_node("pause")["pause"]["output"] == {"waited_until": wake.isoformat()}
    assert parking.STATE_TAG not in flow.run_tags(second)
    assert parking.get_checkpoint(execution_id).state == parking.RUNNING
    assert flow.tick() == [], "resumed once: the execution is no longer waiting"
    assert {run.run_id for run in flow.execution_runs(execution_id)} == {first.run_id, second.run_id}


def test_a_time_already_past_does_not_park(store_url, instance):
    flow = Parking(instance, [DELAYED])
    result = flow.start("delayed", wake="2020-01-01T00:00Z")
    assert result.success and parking.STATE_TAG not in flow.run_tags(result)
    assert workflow_scripts.CALLS == ["before", "beside", "after"]


def test_a_duration_wakes_from_the_time_it_parked_not_from_the_resume(store_url, instance, monkeypatch):
    clock = Clock(monkeypatch)
    spec = {
        "name": "waits_an_hour",
        "steps": [
            {"id": "pause", "type": "delay", "config": {"duration": "60m"}},
            counted_step("after", ["pause"]),
        ],
    }
    flow = Parking(instance, [spec])
    first = flow.start("waits_an_hour")
    wake_at = parking.get_checkpoint(flow.run_tags(first)["junction/execution_id"]).wake_at
    assert timedelta(minutes=59) < wake_at - datetime.now(UTC) <= timedelta(minutes=60)
    clock.advance(minutes=59)
    assert flow.tick() == []
    clock.advance(minutes=2)
    (request,) = flow.tick()
    second = flow.launch(request)
    assert second.output_for_node("after")["pause"]["output"] == {"waited_until": wake_at.isoformat()}
    assert workflow_scripts.CALLS == ["after"]


def test_the_sensor_waits_for_the_parked_run_to_finish(store_url, instance):
    flow = Parking(instance, [DELAYED])
    first = flow.start("delayed", wake=(datetime.now(UTC) + timedelta(seconds=1)).isoformat())
    execution_id = flow.run_tags(first)["junction/execution_id"]
    # As if the parked run were still busy with other branches when the wake-up time came.
    parking.park(execution_id, "delayed", {}, "pause", "a-run-that-is-not-finished", datetime.now(UTC))
    instance.add_run(
        dg.DagsterRun(
            job_name="delayed", run_id="a-run-that-is-not-finished", status=dg.DagsterRunStatus.STARTED
        )
    )
    assert flow.tick() == []


def test_workflow_definitions_hold_the_resume_sensor_only_when_a_workflow_parks(tmp_path):
    import yaml

    (tmp_path / "delayed.yaml").write_text(yaml.safe_dump(DELAYED))
    definitions = workflow_definitions(tmp_path)
    sensor = definitions.resolve_sensor_def(RESUME_SENSOR_NAME)
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert {target.job_name for target in sensor.targets} == {"delayed"}
    (tmp_path / "delayed.yaml").unlink()
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump({"name": "plain", "steps": [counted_step("only")]}))
    assert not list(workflow_definitions(tmp_path).sensors or [])


def test_the_delay_config_is_checked_at_load_time():
    from orchestration.kernel.spec_errors import SpecError
    from orchestration.workflows.spec import parse_workflow

    for config, message in [
        ({"duration": "soon"}, "'soon' is not a duration"),
        ({}, "give exactly one of duration and until"),
        ({"until": "{{ inputs.nope }}"}, "unknown input 'nope'"),
    ]:
        with pytest.raises(SpecError, match=message):
            parse_workflow({"name": "bad", "steps": [{"id": "pause", "type": "delay", "config": config}]})
