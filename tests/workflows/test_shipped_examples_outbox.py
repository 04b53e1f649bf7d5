"""The shipped examples run out of the box: their channels are outboxes under JUNCTION_HOME, so a fresh
clone needs no mail server. `order_review` runs in process against a local order service."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg

from orchestration.settings import PROJECT_ROOT
from orchestration.workflows.factory import workflow_definitions

ORDER = {
    "total": 2500,
    "customer": {"name": "Acme"},
    "lines": [
        {"sku": "a", "quantity": 2, "unit_price": 1000},
        {"sku": "b", "quantity": 1, "unit_price": 500},
    ],
}


def test_order_review_reports_a_large_order_to_the_finance_outbox(store_url, junction_home: Path, api_server):
    from orchestration.store import session_scope
    from orchestration.store.models import NotificationDelivery

    api_server.answer("/orders/A-1001", 200, ORDER)
    api_server.answer("/orders/A-7", 200, ORDER | {"total": 70})
    job = workflow_definitions(PROJECT_ROOT / "orchestration/workflows").resolve_job_def("order_review")
    with dg.instance_for_test() as instance:
        large = job.execute_in_process(
            run_config={"order_id": "A-1001", "orders_api": api_server.url}, instance=instance
        )
        small = job.execute_in_process(
            run_config={"order_id": "A-7", "orders_api": api_server.url}, instance=instance
        )
    assert large.success and small.success
    assert large.output_for_node("notify_finance")["notify_finance"]["output"]["status"] == "delivered"

    # Only the large order is reported: one line, in the default outbox of the shipped `finance` channel.
    (entry,) = [
        json.loads(line) for line in (junction_home / "outbox" / "finance.jsonl").read_text().splitlines()
    ]
    assert (entry["channel"], entry["subject"]) == ("finance", "Large order A-1001: 2500")
    assert entry["metadata"] == {
        "workflow": "order_review",
        "step": "notify_finance",
        "execution_id": large.run_id,
    }
    assert f"Order A-1001 from Acme\ntotals 2500 (2 lines).\nExecution {large.run_id}." in entry["body"]
    with session_scope() as session:
        rows = session.query(NotificationDelivery).all()
    assert [(r.channel, r.kind, r.status) for r in rows] == [("finance", "outbox", "delivered")]
