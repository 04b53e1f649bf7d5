"""The shipped REST example on a running embedded platform: `platform_audit` reads the gateway's own
paged audit API with the local admin key `junction dev` exports, into SQLite, and a second run asks
only for what is new since the cursor it committed."""

from __future__ import annotations

import sqlite3
import time

import httpx
import pytest

pytestmark = pytest.mark.slow
PIPELINE = "platform_audit"


def finished(client: httpx.Client, run_id: str, timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = client.get(f"/v1/runs/{run_id}").json()
        if run["status"] in {"SUCCESS", "FAILURE", "CANCELED"}:
            return run
        time.sleep(0.5)
    raise AssertionError(f"run {run_id} did not finish in {timeout_s}s")


def launch(client: httpx.Client) -> dict:
    launched = client.post(f"/v1/jobs/{PIPELINE}_pipeline/runs", json={})
    assert launched.status_code == 201, launched.text
    run = finished(client, launched.json()["run_id"])
    assert run["status"] == "SUCCESS", run
    report = client.get(
        f"/v1/pipelines/{PIPELINE}/reports/{run['run_id']}", headers={"Accept": "application/json"}
    )
    assert report.status_code == 200, report.text
    return report.json()


def test_the_audit_log_syncs_incrementally_from_the_platforms_own_api(live_platform, admin_key):
    with httpx.Client(
        base_url=f"{live_platform.base_url}/gateway", headers={"X-API-Key": admin_key}, timeout=30
    ) as client:
        first = launch(client)
        warehouse = live_platform.home / "warehouse" / "platform_audit.db"
        with sqlite3.connect(warehouse) as connection:
            stored = dict(connection.execute("SELECT id, action FROM platform_audit").fetchall())
        entries = client.get("/v1/audit", params={"limit": 1000}).json()["entries"]
        launched_first = [
            e["id"]
            for e in entries
            if e["action"] == "run.launch" and e["target"] == f"job:{PIPELINE}_pipeline"
        ]
        # Every entry up to the first launch (its own launch included) reached the warehouse.
        assert launched_first and launched_first[-1] in stored
        assert first["sync"]["rows_new"] == len(stored) and first["sync"]["cursor_before"] is None

        second = launch(client)
        assert second["sync"]["cursor_before"] == first["sync"]["cursor_after"]
        assert second["sync"]["rows_new"] >= 1  # at least the second launch's entry
        with sqlite3.connect(warehouse) as connection:
            total = connection.execute("SELECT COUNT(*) FROM platform_audit").fetchone()[0]
        assert total == len(stored) + second["sync"]["rows_new"]
