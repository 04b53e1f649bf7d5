"""The Sync step on a real instance with a real run queue and the real resume sensor: the child run is
queued once (a retried or resumed step finds it), the workflow parks holding no run, the sensor
resumes it when the child has finished, and the child's counts and score become the step's output."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
import yaml
from workflow_harness import Location, queued_instance  # noqa: F401 - the fixture

from orchestration.settings import reset_settings_cache
from orchestration.workflows import parking
from orchestration.workflows.resume import RESUME_SENSOR_NAME

ROWS = [
    "id,customer,amount,status",
    "1,alice,10.5,paid",
    "2,bob,oops,paid",
    "3,carol,7,cancelled",
    "4,dave,-3,paid",
]
PIPELINE = {
    "source": {"format": "csv", "path": "orders.csv"},
    "transforms": [
        {"cast": {"id": "int64", "amount": "float64"}},
        {"filter": {"field": "status", "op": "ne", "value": "cancelled"}},
    ],
    # A compound condition: evaluated by the kernel (no Great Expectations import in these tests).
    "rules": [
        {
            "name": "positive_or_first",
            "condition": {"any": [{"field": "amount", "op": "gt", "value": 0}, {"field": "id", "op": "eq", "value": 1}]},
            "severity": "warn",
        }
    ],
}  # fmt: skip
WORKFLOW = {
    "name": "sync_orders",
    "inputs": {"note": {"type": "string", "default": "nightly"}},
    "steps": [
        {
            "id": "load",
            "type": "sync",
            "config": {"pipeline": "orders", "tags": {"why": "{{ inputs.note }}"}},
        },
        {
            "id": "report",
            "type": "custom_script",
            "depends_on": ["load"],
            "config": {
                "callable": "compensation_scripts:record",
                "arguments": {"label": "report", "loaded": "{{ steps.load.output.loaded }}"},
            },
        },
    ],
}


@pytest.fixture
def location(store_url, tmp_path: Path, monkeypatch, queued_instance) -> Location:  # noqa: F811
    import compensation_scripts

    compensation_scripts.CALLS.clear()
    pipelines, workflows = tmp_path / "pipelines", tmp_path / "workflows"
    pipelines.mkdir()
    workflows.mkdir()
    (pipelines / "orders.yaml").write_text(yaml.safe_dump(PIPELINE))
    (pipelines / "orders.csv").write_text("\n".join(ROWS) + "\n")
    (workflows / "sync_orders.yaml").write_text(yaml.safe_dump(WORKFLOW))
    monkeypatch.setenv("JUNCTION_PIPELINES_DIR", str(pipelines))
    monkeypatch.setenv("JUNCTION_WORKFLOWS_DIR", str(workflows))
    reset_settings_cache()
    return Location(queued_instance)


def test_sync_queues_the_child_once_parks_and_resumes_with_its_counts(location):
    import compensation_scripts

    first = location.start("sync_orders")
    assert first.status == dg.DagsterRunStatus.SUCCESS
    assert first.tags[parking.STATE_TAG] == parking.WAITING and first.tags[parking.PARKED_STEP_TAG] == "load"
    execution_id = first.tags["junction/execution_id"]
    assert location.step_statuses(first) == {"load": "SUCCESS", "report": "SKIPPED"}
    (child,) = location.runs(**{"junction/sync_step": "load"})
    assert child.status == dg.DagsterRunStatus.QUEUED, "through the run queue, not started by the step"
    assert child.job_name == "orders_pipeline"
    assert child.tags["junction/execution_id"] == execution_id
    assert child.tags["junction/parent_run"] == first.run_id
    assert child.tags["why"] == "nightly" and child.tags["junction/pipeline"] == "orders"
    checkpoint = parking.get_checkpoint(execution_id)
    assert checkpoint.state == parking.WAITING and checkpoint.waiting_on_run_id == child.run_id

    assert not location.tick(RESUME_SENSOR_NAME).run_requests, "the child has not run yet"
    # A retried step (here: another run of the same execution) finds the child instead of launching one.
    again = location.start("sync_orders", tags={"junction/execution_id": execution_id})
    assert again.status == dg.DagsterRunStatus.SUCCESS
    assert [run.run_id for run in location.runs(**{"junction/sync_step": "load"})] == [child.run_id]

    finished = location.run_queued(child)
    assert finished.status == dg.DagsterRunStatus.SUCCESS
    (request,) = location.tick(RESUME_SENSOR_NAME).run_requests
    assert request.run_key == f"resume:{execution_id}:load"
    resumed = location.launch(request)
    assert resumed.status == dg.DagsterRunStatus.SUCCESS
    assert location.step_statuses(resumed) == {"load": "SUCCESS", "report": "SUCCESS"}
    output = location.outputs(resumed)["load"]["output"]
    # 4 rows read: bob's amount is quarantined by the cast, carol's order filtered, 2 loaded.
    assert output["run_id"] == child.run_id and output["status"] == "SUCCESS"
    assert (output["read"], output["loaded"], output["quarantined"], output["filtered"]) == (4, 2, 1, 1)
    # Dave's -3 fails the one rule (a warning): no check passed; of the 3 rows not filtered, only
    # alice's passes every check (bob's was quarantined).
    assert output["score"] == 0.0 and output["score_rows"] == 0.3333
    assert output["assets"]["orders_staged"]["loaded"] == 2
    assert compensation_scripts.CALLS == [("report", {"loaded": "2"})]
    assert len(location.runs(**{"junction/sync_step": "load"})) == 1, "launched exactly once"
    assert not location.tick(RESUME_SENSOR_NAME).run_requests


def test_a_failed_child_fails_the_step_naming_the_child_run(location, tmp_path):
    import compensation_scripts

    (tmp_path / "pipelines" / "orders.csv").unlink()
    first = location.start("sync_orders")
    (child,) = location.runs(**{"junction/sync_step": "load"})
    assert location.run_queued(child).status == dg.DagsterRunStatus.FAILURE
    (request,) = location.tick(RESUME_SENSOR_NAME).run_requests
    resumed = location.launch(request)
    assert resumed.status == dg.DagsterRunStatus.FAILURE
    assert location.step_statuses(resumed)["load"] == "FAILURE"
    assert compensation_scripts.CALLS == [], "nothing after the failed sync ran"
    (message,) = location.failure_messages(resumed)
    assert f"child run {child.run_id} (orders_pipeline) ended FAILURE" in message
    assert first.run_id != resumed.run_id


def test_continue_on_failure_makes_the_failed_child_the_output(location, tmp_path):
    spec = yaml.safe_load((tmp_path / "workflows" / "sync_orders.yaml").read_text())
    spec["steps"][0]["continue_on_failure"] = True
    spec["steps"][1]["config"]["arguments"]["loaded"] = "{{ steps.load.status }}"
    (tmp_path / "workflows" / "sync_orders.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "pipelines" / "orders.csv").unlink()
    location.start("sync_orders")
    (child,) = location.runs(**{"junction/sync_step": "load"})
    location.run_queued(child)
    (request,) = location.tick(RESUME_SENSOR_NAME).run_requests
    resumed = location.launch(request)
    assert resumed.status == dg.DagsterRunStatus.SUCCESS
    assert resumed.tags["junction/failed_steps"] == "load"
    assert child.run_id in location.outputs(resumed)["load"]["output"]["error"]["message"]


def test_an_asset_selection_is_materialized_by_the_implicit_asset_job(location, tmp_path):
    spec = yaml.safe_load((tmp_path / "workflows" / "sync_orders.yaml").read_text())
    spec["steps"][0]["config"] = {"assets": ["orders_staged"]}
    (tmp_path / "workflows" / "sync_orders.yaml").write_text(yaml.safe_dump(spec))
    location.start("sync_orders")
    (child,) = location.runs(**{"junction/sync_step": "load"})
    assert child.asset_selection == {dg.AssetKey("orders_staged")}
    assert location.run_queued(child).status == dg.DagsterRunStatus.SUCCESS
    (request,) = location.tick(RESUME_SENSOR_NAME).run_requests
    resumed = location.launch(request)
    assert location.outputs(resumed)["load"]["output"]["loaded"] == 2


def test_an_unknown_pipeline_fails_the_step_naming_it(location, tmp_path):
    spec = yaml.safe_load((tmp_path / "workflows" / "sync_orders.yaml").read_text())
    spec["steps"][0]["config"] = {"pipeline": "nope"}
    (tmp_path / "workflows" / "sync_orders.yaml").write_text(yaml.safe_dump(spec))
    run = location.start("sync_orders")
    assert run.status == dg.DagsterRunStatus.FAILURE
    assert (
        "pipeline 'nope': no job 'nope_pipeline' in this code location" in location.failure_messages(run)[0]
    )


def test_an_in_process_run_cannot_sync_and_says_why(store_url, run_spec):
    run = run_spec(
        {"name": "in_process", "steps": [{"id": "load", "type": "sync", "config": {"pipeline": "x"}}]}
    )
    assert not run.result.success
    failure = run.result.get_step_failure_events()[0]
    assert "launch the workflow through Dagster" in str(
        failure.event_specific_data.user_failure_data.description
    )


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({}, "give exactly one of pipeline and assets"),
        ({"pipeline": "a", "assets": ["b"]}, "give exactly one of pipeline and assets"),
        ({"pipeline": "a", "tags": {"x": "{{ inputs.nope }}"}}, "unknown input 'nope'"),
        ({"pipeline": "a", "timeout": "soon"}, "'soon' is not a duration"),
    ],
)
def test_the_sync_config_is_checked_at_load_time(config, message):
    from orchestration.kernel.spec_errors import SpecError
    from orchestration.workflows.spec import parse_workflow

    with pytest.raises(SpecError, match=message):
        parse_workflow({"name": "bad", "steps": [{"id": "load", "type": "sync", "config": config}]})


def with_timeout(tmp_path: Path, **config) -> None:
    spec = yaml.safe_load((tmp_path / "workflows" / "sync_orders.yaml").read_text())
    spec["steps"][0]["config"].update(config)
    (tmp_path / "workflows" / "sync_orders.yaml").write_text(yaml.safe_dump(spec))


def test_the_timeout_resumes_the_execution_fails_the_step_and_terminates_the_child(
    location, tmp_path, monkeypatch
):
    from parking_harness import Clock

    clock = Clock(monkeypatch)
    with_timeout(tmp_path, timeout="10m")
    first = location.start("sync_orders")
    (child,) = location.runs(**{"junction/sync_step": "load"})
    checkpoint = parking.get_checkpoint(first.tags["junction/execution_id"])
    assert checkpoint.waiting_on_run_id == child.run_id and checkpoint.wake_at is not None, "the deadline"
    assert not location.tick(RESUME_SENSOR_NAME).run_requests, "the child is queued, the timeout not passed"

    clock.advance(minutes=11)
    (request,) = location.tick(RESUME_SENSOR_NAME).run_requests  # the child is still queued
    resumed = location.launch(request)
    assert resumed.status == dg.DagsterRunStatus.FAILURE
    (message,) = location.failure_messages(resumed)
    assert (
        f"child run {child.run_id} (orders_pipeline) was still QUEUED when the step's timeout of 10m "
        "passed; terminated it"
    ) in message
    assert location.instance.get_run_by_id(child.run_id).status == dg.DagsterRunStatus.CANCELED
    assert not location.tick(RESUME_SENSOR_NAME).run_requests, "resumed once"


def test_a_child_that_finishes_in_time_is_not_affected_by_the_timeout(location, tmp_path, monkeypatch):
    with_timeout(tmp_path, timeout="1h")
    location.start("sync_orders")
    (child,) = location.runs(**{"junction/sync_step": "load"})
    assert location.run_queued(child).status == dg.DagsterRunStatus.SUCCESS
    (request,) = location.tick(RESUME_SENSOR_NAME).run_requests
    resumed = location.launch(request)
    assert resumed.status == dg.DagsterRunStatus.SUCCESS
    assert location.outputs(resumed)["load"]["output"]["loaded"] == 2


def test_cancel_child_on_timeout_false_leaves_the_child_in_the_queue(location, tmp_path, monkeypatch):
    from parking_harness import Clock

    clock = Clock(monkeypatch)
    with_timeout(tmp_path, timeout="5m", cancel_child_on_timeout=False)
    spec = yaml.safe_load((tmp_path / "workflows" / "sync_orders.yaml").read_text())
    spec["steps"][0]["continue_on_failure"] = True
    spec["steps"][1]["config"]["arguments"]["loaded"] = "{{ steps.load.status }}"
    (tmp_path / "workflows" / "sync_orders.yaml").write_text(yaml.safe_dump(spec))
    location.start("sync_orders")
    (child,) = location.runs(**{"junction/sync_step": "load"})
    clock.advance(minutes=6)
    (request,) = location.tick(RESUME_SENSOR_NAME).run_requests
    resumed = location.launch(request)
    assert resumed.status == dg.DagsterRunStatus.SUCCESS, "continue_on_failure: the error is the output"
    error = location.outputs(resumed)["load"]["output"]["error"]["message"]
    assert error == (
        f"child run {child.run_id} (orders_pipeline) was still QUEUED when the step's timeout of 5m "
        "passed; left it running (cancel_child_on_timeout: false)"
    )
    assert location.instance.get_run_by_id(child.run_id).status == dg.DagsterRunStatus.QUEUED
