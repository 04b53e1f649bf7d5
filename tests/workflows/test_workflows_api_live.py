"""Launching a workflow execution through the gateway of a real `junction dev`, following it through
the run queue, and finding it in the statistics (Dagster GraphQL + the platform store)."""

from __future__ import annotations

import time

import httpx
import pytest

pytestmark = pytest.mark.slow


def test_launch_through_the_api_and_find_the_execution_in_the_statistics(
    live_platform, admin_key, api_server
):
    api_server.answer("/orders/A-7", body={"total": 10, "customer": {"name": "Ada"}, "lines": []})
    base = f"{live_platform.base_url}/gateway"
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {admin_key}"}, timeout=30) as admin:
        created = admin.post(
            "/v1/keys",
            json={
                "name": "order-launcher",
                "scopes": ["workflows:launch:order_review", "workflows:read", "runs:read"],
            },
        )
        assert created.status_code == 201, created.text
        key = created.json()["key"]
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        launched = client.post(
            "/v1/workflows/order_review/executions",
            json={"inputs": {"order_id": "A-7", "orders_api": api_server.url}},
        )
        assert launched.status_code == 201, launched.text
        body = launched.json()
        execution_id, run_id = body["execution_id"], body["run_id"]
        assert body["url"].endswith(f"/runs/{run_id}")

        run = client.get(f"/v1/runs/{run_id}").json()
        assert run["status"] in ("QUEUED", "NOT_STARTED", "STARTING", "STARTED", "SUCCESS"), (
            "through the queue"
        )
        assert run["tags"]["junction/execution_id"] == execution_id
        assert run["tags"]["junction/launched_by"] == "gateway"
        assert run["tags"]["junction/actor"] == "order-launcher"

        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            listed = client.get("/v1/workflows/order_review/executions")
            assert listed.status_code == 200, listed.text
            mine = [e for e in listed.json()["executions"] if e["execution_id"] == execution_id]
            if mine and mine[0]["status"] not in ("running",):
                break
            time.sleep(0.5)
        (execution,) = mine
        assert execution["status"] == "succeeded", execution
        assert execution["runs"] == 1 and execution["run_ids"] == [run_id]
        assert execution["wall_s"] == pytest.approx(execution["active_s"], abs=0.01), "one run: wall = active"
        assert execution["failed_steps"] == []
        assert [request.path for request in api_server.requests] == ["/orders/A-7"]

        succeeded = client.get("/v1/workflows/order_review/executions", params={"status": "succeeded"}).json()
        assert execution_id in {e["execution_id"] for e in succeeded["executions"]}
        failed = client.get("/v1/workflows/order_review/executions", params={"status": "failed"}).json()
        assert execution_id not in {e["execution_id"] for e in failed["executions"]}

        stats = client.get("/v1/workflows/order_review/stats").json()
        assert stats["workflow"] == "order_review" and stats["by_status"]["succeeded"] >= 1
        assert stats["executions"] == sum(stats["by_status"].values())
        steps = {step["step_id"]: step for step in stats["steps"]}
        assert {"lookup_order", "is_large", "large_order_lines", "notify_finance"} <= set(steps)

        listed = client.get("/v1/workflows").json()["workflows"]
        (order_review,) = [item for item in listed if item["name"] == "order_review"]
        assert order_review["api_launch"] is True and order_review["steps"] == 4
        assert order_review["stats"] == stats

        audit = client.get("/v1/audit", headers={"Authorization": f"Bearer {admin_key}"}).json()
        entries = [e for e in audit["entries"] if e["action"] == "workflow.launch"]
        assert any(
            e["details"]["execution_id"] == execution_id and e["actor"] == "order-launcher" for e in entries
        )
