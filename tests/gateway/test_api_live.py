"""The platform API against a real `junction dev`: runs launched, followed, cancelled; metrics."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import free_port

pytestmark = pytest.mark.slow
PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}


def api(platform, key: str) -> httpx.Client:
    return httpx.Client(
        base_url=f"{platform.base_url}/gateway", headers={"Authorization": f"Bearer {key}"}, timeout=30
    )


def follow(client: httpx.Client, run_id: str, timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = client.get(f"/v1/runs/{run_id}")
        assert run.status_code == 200, run.text
        if run.json()["status"] in FINISHED:
            return run.json()
        time.sleep(0.5)
    raise AssertionError(f"run {run_id} did not finish in {timeout_s}s")


def create_key(client: httpx.Client, name: str, *scopes: str) -> str:
    response = client.post("/v1/keys", json={"name": name, "scopes": list(scopes)})
    assert response.status_code == 201, response.text
    return response.json()["key"]


def test_launch_a_job_and_follow_it_to_success(live_platform, admin_key):
    with api(live_platform, admin_key) as admin:
        key = create_key(admin, "launcher-live", "runs:launch", "runs:read")
    with api(live_platform, key) as client:
        launched = client.post("/v1/jobs/audit_log_verification/runs", json={"tags": {"team": "data"}})
        assert launched.status_code == 201, launched.text
        body = launched.json()
        assert body["url"] == f"{live_platform.base_url}/runs/{body['run_id']}"

        run = follow(client, body["run_id"])
        assert run["status"] == "SUCCESS"
        assert run["job_name"] == "audit_log_verification"
        assert run["tags"]["junction/actor"] == "launcher-live"
        assert run["tags"]["junction/via"] == "gateway"
        assert run["tags"]["team"] == "data"
        assert run["steps"][0]["key"] == "verify_audit_chain" and run["step_counts"] == {"SUCCESS": 1}
        assert run["started_at"] and run["ended_at"]

        # The UI link answers, and the run shows in the job list as the latest.
        assert httpx.get(body["url"]).status_code == 200
        jobs = {job["name"]: job for job in client.get("/v1/jobs").json()["jobs"]}
        assert jobs["audit_log_verification"]["latest_run"]["run_id"] == body["run_id"]

        # A finished run cannot be cancelled; an unknown one does not exist.
        assert client.post(f"/v1/runs/{body['run_id']}/cancel").status_code == 403  # no runs:cancel scope
    with api(live_platform, admin_key) as admin:
        assert admin.post(f"/v1/runs/{body['run_id']}/cancel").status_code == 409
        assert admin.post("/v1/runs/00000000-0000-0000-0000-000000000000/cancel").status_code == 404
        assert admin.get("/v1/runs/00000000-0000-0000-0000-000000000000").status_code == 404
        entries = admin.get("/v1/audit", params={"action": "run.launch", "actor": "launcher-live"}).json()[
            "entries"
        ]
        assert entries[0]["details"]["run_id"] == body["run_id"]


def test_launch_errors(live_platform, admin_key):
    with api(live_platform, admin_key) as client:
        assert client.post("/v1/jobs/no_such_job/runs", json={}).status_code == 404
        invalid = client.post(
            "/v1/jobs/audit_log_verification/runs", json={"run_config": {"ops": {"nope": {}}}}
        )
        assert invalid.status_code == 422
        assert invalid.json()["field"] == "body.run_config"
        assert (
            client.post("/v1/assets/materializations", json={"assets": ["no/such/asset"]}).status_code == 404
        )


def test_materialize_an_asset_selection(live_platform, admin_key):
    with api(live_platform, admin_key) as client:
        groups = {group["name"]: group for group in client.get("/v1/jobs").json()["asset_groups"]}
        assert "audit_activity" in groups["platform"]["assets"]
        launched = client.post("/v1/assets/materializations", json={"assets": ["audit_activity"]})
        assert launched.status_code == 201, launched.text
        run = follow(client, launched.json()["run_id"])
        assert run["status"] == "SUCCESS"
        assert run["assets"] == ["audit_activity"]


def test_metrics_parse_and_count_runs_from_storage(live_platform, admin_key):
    with api(live_platform, admin_key) as client:
        client.post("/v1/jobs/audit_log_verification/runs", json={})
        response = client.get("/metrics")
    assert response.status_code == 200
    families = {family.name: family for family in text_string_to_metric_families(response.text)}
    runs = {sample.labels["status"]: sample.value for sample in families["junction_dagster_runs"].samples}
    assert set(runs) >= {"QUEUED", "STARTED", "SUCCESS", "FAILURE"}
    assert sum(runs.values()) >= 1
    requests = families["junction_gateway_requests"].samples
    assert any(
        s.labels["route"] == "/v1/jobs/{name}/runs" and s.labels["principal"] == "local-admin"
        for s in requests
    )
    assert families["junction_audit_entries"].samples[0].value >= 1
    assert "junction_api_keys" in families
    # Families present even when empty, so a dashboard's query does not break on a quiet platform.
    assert {"junction_notification_deliveries", "junction_notifications_held"} <= set(families)


def test_analytics_window_per_endpoint_and_key(live_platform, admin_key):
    with api(live_platform, admin_key) as client:
        for _ in range(3):
            client.get("/v1/jobs")
        window = client.get("/v1/analytics/requests", params={"window_s": 600}).json()
    rows = [
        row for row in window["stats"] if row["route"] == "/v1/jobs" and row["principal"] == "local-admin"
    ]
    assert rows and rows[0]["requests"] >= 3 and rows[0]["status_classes"]["2xx"] >= 3
    assert rows[0]["p50_ms"] <= rows[0]["p95_ms"] <= rows[0]["p99_ms"]


def test_standalone_gateway_launches_through_dagster_url(live_platform, admin_key, tmp_path):
    port = free_port()

    env = {k: v for k, v in os.environ.items() if not k.startswith("JUNCTION_") and k != "DAGSTER_HOME"}
    env.update({"JUNCTION_HOME": str(live_platform.home), "JUNCTION_DAGSTER_URL": live_platform.base_url})
    log = open(tmp_path / "gateway.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "orchestration.cli", "gateway", "--port", str(port)],
        env=env,
        cwd=PROJECT_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}/gateway"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            raise AssertionError((tmp_path / "gateway.log").read_text())
        with httpx.Client(base_url=base, headers={"X-API-Key": admin_key}, timeout=30) as client:
            launched = client.post("/v1/jobs/audit_log_verification/runs", json={})
            assert launched.status_code == 201, launched.text
            assert launched.json()["url"].startswith(live_platform.base_url)
            assert follow(client, launched.json()["run_id"])["status"] == "SUCCESS"
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0
        log.close()


def test_cancel_and_materialize_are_audited(live_platform, admin_key):
    with api(live_platform, admin_key) as client:
        # Platform runs go one at a time (a tag concurrency limit): the second waits in the queue.
        first = client.post("/v1/jobs/audit_log_verification/runs", json={}).json()["run_id"]
        run_id = client.post("/v1/jobs/audit_log_verification/runs", json={}).json()["run_id"]
        assert client.get(f"/v1/runs/{run_id}").json()["status"] == "QUEUED"
        cancelled = client.post(f"/v1/runs/{run_id}/cancel")
        assert cancelled.status_code == 202, cancelled.text
        assert follow(client, run_id)["status"] == "CANCELED"
        assert follow(client, first)["status"] == "SUCCESS"
        actions = {
            entry["action"]
            for entry in client.get("/v1/audit", params={"target": f"run:{run_id}"}).json()["entries"]
        }
        assert actions == {"run.cancel"}
        launched = client.post("/v1/assets/materializations", json={"assets": ["audit_activity"]}).json()
        entries = client.get("/v1/audit", params={"action": "assets.materialize"}).json()["entries"]
        mine = [entry for entry in entries if entry["details"]["run_id"] == launched["run_id"]]
        assert [(e["actor"], e["origin"], e["target"]) for e in mine] == [
            ("local-admin", "gateway", "assets:audit_activity")
        ]


def test_docs_page_works_under_the_prefix(live_platform):
    page = httpx.get(f"{live_platform.base_url}/gateway/docs")
    assert page.status_code == 200
    script = page.text.split('src="')[1].split('"')[0]
    assert script.startswith("/gateway/")
    assert httpx.get(f"{live_platform.base_url}{script}").status_code == 200
    assert "/gateway/openapi.json" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    problem = httpx.post(
        f"{live_platform.base_url}/gateway/v1/jobs/x/runs",
        content=b"x",
        headers={"content-type": "text/plain"},
    )
    assert problem.json()["instance"] == "/gateway/v1/jobs/x/runs"
