"""What a waiting execution looks like in the Dagster UI, on a real `junction dev`: an execution parks
on a Delay, is resumed by the sensor, parks on an Approval, is approved through the gateway and
finishes. At each stage the tags of every run are checked, and the Runs page's filter
`junction/state=waiting` (GraphQL's `runsOrError`, what the UI sends) lists exactly the runs that
wait now, the same executions `junction workflows executions --status waiting` and the gateway's
`GET /v1/workflows/{name}/executions?status=waiting` list."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import dagster as dg
import httpx
import pytest
import yaml
from click.testing import CliRunner
from support import execution_runs, wait_until

from orchestration.cli import cli
from orchestration.settings import reset_settings_cache
from orchestration.workflows import parking

pytestmark = pytest.mark.slow

WORKFLOW = {
    "name": "waiting_flow",
    "inputs": {"wake": {"type": "string"}},
    "steps": [
        {"id": "pause", "type": "delay", "config": {"until": "{{ inputs.wake }}"}},
        {
            "id": "sign_off",
            "type": "approval",
            "depends_on": ["pause"],
            "config": {"message": "Go on?", "approvers": {"principals": ["local-admin"]}},
        },
        {
            "id": "done",
            "type": "conditional",
            "depends_on": ["sign_off.approved"],
            "config": {"condition": {"field": "inputs.wake", "op": "exists"}},
        },
    ],
}
WAITING_RUNS = """query Waiting($tags: [ExecutionTag!]) {
  runsOrError(filter: {tags: $tags}) { ... on Runs { results { runId } } }
}"""


def test_park_resume_park_finish_reads_right_in_the_runs_page(
    start_platform, tmp_path, monkeypatch, junction_home
):
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    (workflows / "waiting_flow.yaml").write_text(yaml.safe_dump(WORKFLOW))
    home = tmp_path / "platform-home"
    platform = start_platform({"JUNCTION_HOME": str(home), "JUNCTION_WORKFLOWS_DIR": str(workflows)})
    platform.wait_ready()
    key = (home / "admin.key").read_text().strip()
    monkeypatch.setenv("JUNCTION_HOME", str(home))
    monkeypatch.setenv("JUNCTION_WORKFLOWS_DIR", str(workflows))
    reset_settings_cache()
    api = httpx.Client(base_url=f"{platform.base_url}/gateway", headers={"X-API-Key": key}, timeout=30)

    def runs_of(execution_id: str) -> list[dg.DagsterRun]:
        return list(reversed(execution_runs(home / "dagster", execution_id)))  # oldest first

    def waiting_views() -> tuple[set[str], set[str], set[str]]:
        """(runs the UI's waiting filter lists, executions the CLI lists, executions the API lists)."""
        answer = httpx.post(
            f"{platform.base_url}/graphql",
            json={
                "query": WAITING_RUNS,
                "variables": {"tags": [{"key": parking.STATE_TAG, "value": "waiting"}]},
            },
            timeout=30,
        ).json()
        runs = {run["runId"] for run in answer["data"]["runsOrError"]["results"]}
        listed = CliRunner().invoke(
            cli, ["workflows", "executions", "waiting_flow", "--status", "waiting", "--json"]
        )
        assert listed.exit_code == 0, listed.output
        cli_executions = {json.loads(line)["execution_id"] for line in listed.output.splitlines()}
        page = api.get("/v1/workflows/waiting_flow/executions", params={"status": "waiting"})
        assert page.status_code == 200, page.text
        api_executions = {item["execution_id"] for item in page.json()["executions"]}
        return runs, cli_executions, api_executions

    def execution_of(run_ids: set[str]) -> set[str]:
        return {api.get(f"/v1/runs/{run_id}").json()["tags"]["junction/execution_id"] for run_id in run_ids}

    def finished(run_id: str) -> dict | None:
        run = api.get(f"/v1/runs/{run_id}").json()
        return run if run["status"] in ("SUCCESS", "FAILURE", "CANCELED") else None

    # 1. Parked on the Delay.
    wake_at = datetime.now(UTC) + timedelta(seconds=25)
    launched = api.post("/v1/jobs/waiting_flow/runs", json={"run_config": {"wake": wake_at.isoformat()}})
    assert launched.status_code == 201, launched.text
    first = wait_until(lambda: finished(launched.json()["run_id"]), 120, "the first run to park", poll_s=0.5)
    execution_id = first["tags"]["junction/execution_id"]
    assert first["status"] == "SUCCESS" and first["tags"][parking.STATE_TAG] == "waiting"
    assert first["tags"][parking.WAITING_ON_TAG] == f"delay until {parking.moment_text(wake_at)}"
    assert datetime.now(UTC) < wake_at, "checked before the delay is due"
    runs, cli_executions, api_executions = waiting_views()
    assert runs == {first["run_id"]} and cli_executions == api_executions == {execution_id}

    # 2. The sensor resumed it; it parked again, on the Approval.
    def parked_twice():
        runs = runs_of(execution_id)
        return len(runs) == 2 and runs[1].is_finished and runs

    _, second = wait_until(parked_twice, 120, "the delay to resume and the approval to park", poll_s=1)
    assert second.tags[parking.STATE_TAG] == "waiting" and second.tags[parking.PARKED_STEP_TAG] == "sign_off"
    (request,) = api.get("/v1/approvals").json()["approvals"]
    assert second.tags[parking.WAITING_ON_TAG] == f"approval {request['id'][:8]}…: 0 of 1 from local-admin"
    moved_past = runs_of(execution_id)[0].tags
    assert moved_past[parking.STATE_TAG] == "resumed" and moved_past[parking.RESUMED_BY_TAG] == second.run_id
    runs, cli_executions, api_executions = waiting_views()
    assert runs == {second.run_id} and execution_of(runs) == cli_executions == api_executions == {
        execution_id
    }

    # 3. Approved through the gateway: the sensor resumes it and it finishes; nothing says waiting.
    assert api.post(f"/v1/approvals/{request['id']}/approve", json={"comment": "go"}).status_code == 200

    def done():
        runs = runs_of(execution_id)
        return len(runs) == 3 and runs[2].is_finished and runs

    first_run, second_run, third_run = wait_until(done, 120, "the approved execution to finish", poll_s=1)
    assert third_run.status == dg.DagsterRunStatus.SUCCESS and parking.STATE_TAG not in third_run.tags
    assert (first_run.tags[parking.STATE_TAG], first_run.tags[parking.RESUMED_BY_TAG]) == (
        "resumed",
        second_run.run_id,
    )
    assert (second_run.tags[parking.STATE_TAG], second_run.tags[parking.RESUMED_BY_TAG]) == (
        "resumed",
        third_run.run_id,
    )
    assert second_run.tags[parking.WAITING_ON_TAG] == f"nothing: resumed by run {third_run.run_id[:8]}…"
    assert waiting_views() == (set(), set(), set())
    api.close()
    assert platform.stop() == 0
