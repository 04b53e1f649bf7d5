"""The Sync step on the real platform (`junction dev`: code server, daemon, run queue): launched through
the gateway, the workflow queues its child run and parks; the daemon runs the child; the resume sensor
resumes the workflow, whose Sync step exposes the child's counts. One child run, one resumed run."""

from __future__ import annotations

import dagster as dg
import httpx
import pytest
import yaml
from support import execution_runs, wait_until
from test_sync import PIPELINE, ROWS

pytestmark = pytest.mark.slow

WORKFLOW = {
    "name": "platform_sync",
    "steps": [
        {"id": "load", "type": "sync", "config": {"pipeline": "orders"}},
        {
            "id": "enough",
            "type": "conditional",
            "depends_on": ["load"],
            "config": {"condition": {"field": "steps.load.output.loaded", "op": "gte", "value": 2}},
        },
    ],
}


def test_sync_through_the_daemon_and_the_run_queue(start_platform, tmp_path):
    pipelines, workflows = tmp_path / "pipelines", tmp_path / "workflows"
    pipelines.mkdir()
    workflows.mkdir()
    (pipelines / "orders.yaml").write_text(yaml.safe_dump(PIPELINE))
    (pipelines / "orders.csv").write_text("\n".join(ROWS) + "\n")
    (workflows / "platform_sync.yaml").write_text(yaml.safe_dump(WORKFLOW))
    home = tmp_path / "platform-home"
    platform = start_platform(
        {
            "JUNCTION_HOME": str(home),
            "JUNCTION_WORKFLOWS_DIR": str(workflows),
            "JUNCTION_PIPELINES_DIR": str(pipelines),
        }
    )
    platform.wait_ready()
    key = (home / "admin.key").read_text().strip()
    with httpx.Client(base_url=f"{platform.base_url}/gateway", headers={"X-API-Key": key}, timeout=30) as api:
        run_id = api.post("/v1/jobs/platform_sync/runs", json={}).json()["run_id"]
    dagster_home = home / "dagster"

    def all_three_finished():
        runs = execution_runs(dagster_home, run_id)
        return len(runs) == 3 and all(run.is_finished for run in runs) and runs

    resumed, child, first = wait_until(
        all_three_finished, 300, "parent, child and resumed run", poll_s=1
    )  # newest first
    # The parked run, once resumed, says so and by which run (no longer `waiting`).
    assert first.run_id == run_id and first.tags["junction/state"] == "resumed"
    assert first.tags["junction/resumed_by"] == resumed.run_id
    assert child.job_name == "orders_pipeline" and child.status == dg.DagsterRunStatus.SUCCESS
    assert child.tags["junction/parent_run"] == run_id
    assert resumed.status == dg.DagsterRunStatus.SUCCESS
    assert resumed.tags["dagster/run_key"] == f"resume:{run_id}:load"
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        outputs = {
            record.dagster_event.step_key: record.dagster_event.step_output_data
            for record in instance.all_logs(resumed.run_id, of_type=dg.DagsterEventType.STEP_OUTPUT)
        }
    assert outputs["load"].metadata["output"].value["loaded"] == 2
    assert outputs["load"].metadata["output"].value["run_id"] == child.run_id
    assert outputs["enough"].output_name == "then"
    assert platform.stop() == 0


SLOW_LOCATION = """
import time

import dagster as dg

from orchestration.settings import get_settings
from orchestration.workflows.factory import workflow_definitions


@dg.asset
def slow_child() -> None:
    time.sleep(600)


defs = dg.Definitions.merge(
    dg.Definitions(assets=[slow_child]), workflow_definitions(get_settings().workflows_dir)
)
"""
TIMEOUT_WORKFLOW = {
    "name": "sync_with_timeout",
    "steps": [{"id": "load", "type": "sync", "config": {"assets": ["slow_child"], "timeout": "1m"}}],
}


def test_a_child_running_past_the_timeout_is_terminated_and_fails_the_step(start_platform, tmp_path):
    """The daemon starts the child (an asset sleeping for ten minutes); the resume sensor resumes the
    parked execution once the 1m timeout has passed, and the step terminates the child through the
    run coordinator, as the UI's Terminate does."""
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    (workflows / "sync_with_timeout.yaml").write_text(yaml.safe_dump(TIMEOUT_WORKFLOW))
    (tmp_path / "slow_location.py").write_text(SLOW_LOCATION)
    location = {
        "relative_path": "slow_location.py",
        "location_name": "slow",
        "working_directory": str(tmp_path),
    }
    (tmp_path / "workspace.yaml").write_text(yaml.safe_dump({"load_from": [{"python_file": location}]}))
    home = tmp_path / "platform-home"
    platform = start_platform(
        {"JUNCTION_HOME": str(home), "JUNCTION_WORKFLOWS_DIR": str(workflows)},
        args=("--workspace", str(tmp_path / "workspace.yaml")),
    )
    platform.wait_ready(timeout_s=300)
    key = (home / "admin.key").read_text().strip()
    with httpx.Client(base_url=f"{platform.base_url}/gateway", headers={"X-API-Key": key}, timeout=30) as api:
        run_id = api.post("/v1/jobs/sync_with_timeout/runs", json={}).json()["run_id"]
    dagster_home = home / "dagster"

    def child_started():
        runs = [run for run in execution_runs(dagster_home, run_id) if run.job_name != "sync_with_timeout"]
        return runs and runs[0].status == dg.DagsterRunStatus.STARTED and runs[0]

    child = wait_until(child_started, 120, "the child run to start", poll_s=1, detail=platform.log)

    def all_three_finished():
        runs = execution_runs(dagster_home, run_id)
        return len(runs) == 3 and all(run.is_finished for run in runs) and runs

    resumed, _, first = wait_until(all_three_finished, 240, "the timeout to end the child", poll_s=1)
    # The parked run, once resumed, says so and by which run (no longer `waiting`).
    assert first.run_id == run_id and first.tags["junction/state"] == "resumed"
    assert first.tags["junction/resumed_by"] == resumed.run_id
    assert resumed.tags["dagster/run_key"] == f"resume:{run_id}:load"
    assert resumed.status == dg.DagsterRunStatus.FAILURE
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        assert instance.get_run_by_id(child.run_id).status == dg.DagsterRunStatus.CANCELED
        (failure,) = instance.all_logs(resumed.run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
        child_created = instance.get_run_record_by_id(child.run_id).create_timestamp
        resumed_created = instance.get_run_record_by_id(resumed.run_id).create_timestamp
    message = str(failure.dagster_event.event_specific_data.user_failure_data.description)
    assert (
        f"child run {child.run_id} (__ASSET_JOB) was still STARTED when the step's timeout of 1m "
        "passed; terminated it"
    ) in message
    # Resumed at the deadline, not before (the sensor's 15 s interval decides how soon after).
    assert (resumed_created - child_created).total_seconds() >= 60
    assert platform.stop() == 0
