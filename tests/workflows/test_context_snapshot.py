"""The context snapshot: one engine event at the end of every workflow run — succeeded, failed or
parked — holding the inputs and every step state of the run, with secrets masked."""

from __future__ import annotations

import dagster as dg

from orchestration.workflows.snapshot import SNAPSHOT_MESSAGE

SECRET_ENV = "JUNCTION_TEST_SNAPSHOT_TOKEN"
SECRET = "sk-snapshot-very-secret"


def snapshots(run) -> list[dict]:
    records = run.instance.all_logs(run.result.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT)
    return [
        record.dagster_event.event_specific_data.metadata["context"].value
        for record in records
        if record.dagster_event.message == SNAPSHOT_MESSAGE
    ]


def test_the_snapshot_holds_inputs_and_outputs_with_secrets_masked(run_spec, api_server, monkeypatch):
    monkeypatch.setenv(SECRET_ENV, SECRET)
    api_server.answer("/orders/A-1", 200, {"total": 10, "echo": f"Bearer {SECRET}", "api_token": "t-123"})
    spec = {
        "name": "snap",
        "inputs": {"order_id": {"type": "string"}, "password": {"type": "string", "default": "hunter2"}},
        "steps": [
            {
                "id": "lookup",
                "type": "http_request",
                "config": {
                    "url": api_server.url + "/orders/{{ inputs.order_id }}",
                    "auth": {"type": "bearer", "token_env": SECRET_ENV},
                },
            },
            {
                "id": "explode",
                "type": "custom_script",
                "depends_on": ["lookup"],
                "config": {"callable": "workflow_scripts:explode"},
            },
        ],
    }
    run = run_spec(spec, order_id="A-1")
    assert not run.result.success
    (snapshot,) = snapshots(run)
    assert snapshot["inputs"] == {"order_id": "A-1", "password": "***"}
    assert snapshot["execution"] == {"id": run.result.run_id, "workflow": "snap"}
    body = snapshot["steps"]["lookup"]["output"]["body"]
    assert body == {"total": 10, "echo": "Bearer ***", "api_token": "***"}
    assert snapshot["steps"]["explode"] == {
        "output": {"error": {"type": "RuntimeError", "message": "the ledger is closed"}},
        "status": "failed",
    }
    assert SECRET not in str(snapshot)


def test_a_parked_run_has_its_snapshot_too(store_url, run_spec):
    spec = {"name": "parks", "steps": [{"id": "pause", "type": "delay", "config": {"duration": "1h"}}]}
    run = run_spec(spec)
    assert run.result.success
    (snapshot,) = snapshots(run)
    assert snapshot["steps"]["pause"]["status"] == "waiting"
