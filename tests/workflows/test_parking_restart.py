"""Parked executions survive a restart of the whole platform (`junction dev` as a user runs it):
launched through the gateway, one parked on an approval and one on a delay, platform stopped, the
approval decided from the CLI while it is down (and the delay's time passing), platform started
again: the resume sensor of the new daemon resumes each of them, once."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import dagster as dg
import httpx
import pytest
import yaml
from click.testing import CliRunner
from support import execution_runs, wait_until

from orchestration.cli import cli
from orchestration.settings import reset_settings_cache
from orchestration.workflows.resume import RESUME_INTERVAL_S

pytestmark = pytest.mark.slow

WORKFLOW = {
    "name": "restart_approval",
    "inputs": {"amount": {"type": "number", "default": 5000}},
    "steps": [
        {
            "id": "sign_off",
            "type": "approval",
            "config": {
                "message": "Approve {{ inputs.amount }}",
                "approvers": {"principals": ["local-admin"]},
            },
        },
        {
            "id": "large",
            "type": "conditional",
            "depends_on": ["sign_off.approved"],
            "config": {"condition": {"field": "inputs.amount", "op": "gt", "value": 1000}},
        },
    ],
}


DELAY_WORKFLOW = {
    "name": "restart_delay",
    "inputs": {"wake": {"type": "string"}},
    "steps": [
        {"id": "pause", "type": "delay", "config": {"until": "{{ inputs.wake }}"}},
        {
            "id": "later",
            "type": "conditional",
            "depends_on": ["pause"],
            "config": {"condition": {"field": "inputs.wake", "op": "exists"}},
        },
    ],
}


def test_an_approval_survives_a_platform_restart_and_resumes_once(
    start_platform, tmp_path, monkeypatch, junction_home
):
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    (workflows / "restart_approval.yaml").write_text(yaml.safe_dump(WORKFLOW))
    (workflows / "restart_delay.yaml").write_text(yaml.safe_dump(DELAY_WORKFLOW))
    home = tmp_path / "platform-home"
    environment = {"JUNCTION_HOME": str(home), "JUNCTION_WORKFLOWS_DIR": str(workflows)}

    first_platform = start_platform(environment)
    first_platform.wait_ready()
    key = (home / "admin.key").read_text().strip()
    with httpx.Client(
        base_url=f"{first_platform.base_url}/gateway", headers={"X-API-Key": key}, timeout=30
    ) as api:
        # Late enough to pass only while the platform is down (checked below), early enough not to wait long.
        wake_at = datetime.now(UTC) + timedelta(seconds=45)
        wake = wake_at.isoformat()
        delayed_run_id = api.post("/v1/jobs/restart_delay/runs", json={"run_config": {"wake": wake}}).json()[
            "run_id"
        ]
        run_id = api.post("/v1/jobs/restart_approval/runs", json={}).json()["run_id"]

        def ended(some_run_id: str):
            run = api.get(f"/v1/runs/{some_run_id}").json()
            return run["status"] in ("SUCCESS", "FAILURE") and run

        parked = wait_until(lambda: ended(run_id), 180, "the approval's first run to end", poll_s=1)
        delayed = wait_until(lambda: ended(delayed_run_id), 180, "the delay's first run to end", poll_s=1)
        (pending,) = api.get("/v1/approvals").json()["approvals"]
    assert parked["status"] == "SUCCESS" and parked["tags"]["junction/state"] == "waiting"
    assert delayed["status"] == "SUCCESS" and delayed["tags"]["junction/state"] == "waiting"
    execution_id = parked["tags"]["junction/execution_id"]
    delayed_execution_id = delayed["tags"]["junction/execution_id"]
    assert pending["execution_id"] == execution_id
    assert first_platform.stop() == 0
    assert datetime.now(UTC) < wake_at, "the delay must still be pending when the platform stops"

    # Decided while the whole platform is down: the decision is a row in the store.
    monkeypatch.setenv("JUNCTION_HOME", str(home))
    reset_settings_cache()
    decided = CliRunner().invoke(cli, ["approvals", "approve", pending["id"], "--as", "local-admin"])
    assert decided.exit_code == 0, decided.output

    second_platform = start_platform(environment)
    second_platform.wait_ready()
    dagster_home = home / "dagster"

    def resumed_and_finished(some_execution_id: str):
        runs = execution_runs(dagster_home, some_execution_id)
        return len(runs) == 2 and runs[0].is_finished and runs

    for some_execution_id, parked_run_id, step in [
        (execution_id, run_id, "sign_off"),
        (delayed_execution_id, delayed_run_id, "pause"),
    ]:
        runs = wait_until(lambda: resumed_and_finished(some_execution_id), 180, f"{step} to resume", poll_s=1)  # noqa: B023
        resumed = runs[0]  # newest first
        assert resumed.status == dg.DagsterRunStatus.SUCCESS
        assert resumed.tags["dagster/run_key"] == f"resume:{some_execution_id}:{step}"
        assert resumed.tags["junction/resumed_from"] == parked_run_id
    # Another sensor interval later there is still exactly one resumed run of each.
    time.sleep(RESUME_INTERVAL_S + 2)
    assert len(execution_runs(dagster_home, execution_id)) == 2
    assert len(execution_runs(dagster_home, delayed_execution_id)) == 2
    assert second_platform.stop() == 0
