"""A parked execution survives a restart of the whole platform (`junction dev` as a user runs it):
launched through the gateway, parked on an approval, platform stopped, approved from the CLI while
it is down, platform started again: the resume sensor of the new daemon resumes it, once."""

from __future__ import annotations

import time
from pathlib import Path

import dagster as dg
import httpx
import pytest
import yaml
from click.testing import CliRunner

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


def execution_runs(dagster_home: Path, execution_id: str) -> list[dg.DagsterRun]:
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        return list(instance.get_runs(filters=dg.RunsFilter(tags={"junction/execution_id": execution_id})))


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def test_an_approval_survives_a_platform_restart_and_resumes_once(
    start_platform, tmp_path, monkeypatch, junction_home
):
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    (workflows / "restart_approval.yaml").write_text(yaml.safe_dump(WORKFLOW))
    home = tmp_path / "platform-home"
    environment = {"JUNCTION_HOME": str(home), "JUNCTION_WORKFLOWS_DIR": str(workflows)}

    first_platform = start_platform(environment)
    first_platform.wait_ready()
    key = (home / "admin.key").read_text().strip()
    with httpx.Client(
        base_url=f"{first_platform.base_url}/gateway", headers={"X-API-Key": key}, timeout=30
    ) as api:
        run_id = api.post("/v1/jobs/restart_approval/runs", json={}).json()["run_id"]
        parked = wait_for(
            lambda: (run := api.get(f"/v1/runs/{run_id}").json())["status"] in ("SUCCESS", "FAILURE") and run,
            180,
            "the first run to end",
        )
        (pending,) = api.get("/v1/approvals").json()["approvals"]
    assert parked["status"] == "SUCCESS" and parked["tags"]["junction/state"] == "waiting"
    execution_id = parked["tags"]["junction/execution_id"]
    assert pending["execution_id"] == execution_id
    assert first_platform.stop() == 0

    # Decided while the whole platform is down: the decision is a row in the store.
    monkeypatch.setenv("JUNCTION_HOME", str(home))
    reset_settings_cache()
    decided = CliRunner().invoke(cli, ["approvals", "approve", pending["id"], "--as", "local-admin"])
    assert decided.exit_code == 0, decided.output

    second_platform = start_platform(environment)
    second_platform.wait_ready()
    dagster_home = home / "dagster"

    def resumed_and_finished():
        runs = execution_runs(dagster_home, execution_id)
        return len(runs) == 2 and runs[0].is_finished and runs

    runs = wait_for(resumed_and_finished, 180, "the resumed run to finish")
    resumed = runs[0]  # newest first
    assert resumed.status == dg.DagsterRunStatus.SUCCESS
    assert resumed.tags["dagster/run_key"] == f"resume:{execution_id}:sign_off"
    assert resumed.tags["junction/resumed_from"] == run_id
    # Another sensor interval later there is still exactly one resumed run.
    time.sleep(RESUME_INTERVAL_S + 2)
    assert len(execution_runs(dagster_home, execution_id)) == 2
    assert second_platform.stop() == 0
