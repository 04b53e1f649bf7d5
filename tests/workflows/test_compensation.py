"""Compensation runs and on-failure notifications from the real run-failure sensor, on a real instance
and store: the completed steps' compensations run in the reverse order of completion — including steps
completed in an earlier run of a resumed execution — once per execution; the on-failure notification
reaches a real webhook receiver and is recorded and audited."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml
from parking_harness import Clock
from support import wait_until
from test_http_and_notification_steps import SECRET, SECRET_ENV, webhook  # noqa: F401 - the receiver fixture

from orchestration.workflows import parking
from orchestration.workflows.compensation import COMPENSATING_TAG, FAILURE_SENSOR_NAME
from orchestration.workflows.factory import workflow_definitions
from orchestration.workflows.resume import RESUME_SENSOR_NAME


def script(step_id: str, depends_on: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "id": step_id,
        "type": "custom_script",
        "depends_on": depends_on or [],
        "config": {"callable": "compensation_scripts:record", "arguments": {"label": step_id}},
        **extra,
    }


def undo(compensation_id: str, of: str) -> dict[str, Any]:
    """A compensation that records what its step returned (it sees the step's output)."""
    return {
        "id": compensation_id,
        "type": "custom_script",
        "config": {
            "callable": "compensation_scripts:record",
            "arguments": {"label": compensation_id, "undoes": f"{{{{ steps.{of}.output.label }}}}"},
        },
    }


FAILING_SHIP = {
    "id": "ship",
    "type": "custom_script",
    "depends_on": ["charge"],
    "config": {"callable": "compensation_scripts:fail", "arguments": {"message": "no courier"}},
}
SAGA = {
    "name": "order_saga",
    "inputs": {"order_id": {"type": "string", "default": "A-1"}},
    "steps": [
        script("reserve", compensate=[undo("release", "reserve")]),
        script("note", ["reserve"]),  # completed, but nothing to undo
        script("charge", ["reserve"], compensate=[undo("refund", "charge"), undo("tell_bank", "charge")]),
        FAILING_SHIP,
    ],
    "on_failure": [
        {
            "channel": "finance",
            "subject": "{{ execution.workflow }} failed for {{ inputs.order_id }}",
            "body": "run {{ failure.run_id }} failed at {{ failure.steps | join(',') }}: {{ failure.message }}",
        }
    ],
}
# Declared in another order than the steps complete: `charge` waits for the delay, `reserve` runs first.
PARKED_SAGA = {
    "name": "parked_saga",
    "steps": [
        script("charge", ["pause"], compensate=[undo("refund", "charge")]),
        FAILING_SHIP,
        {"id": "pause", "type": "delay", "depends_on": ["reserve"], "config": {"duration": "60m"}},
        script("reserve", compensate=[undo("release", "reserve")]),
    ],
}


@dataclass
class Location:
    instance: dg.DagsterInstance
    definitions: dg.Definitions
    failure_cursor: str | None = None

    def start(
        self, job_name: str, tags: dict[str, str] | None = None, **inputs: Any
    ) -> dg.ExecuteInProcessResult:
        job = self.definitions.resolve_job_def(job_name)
        return job.execute_in_process(
            run_config=inputs, instance=self.instance, tags=tags, raise_on_error=False
        )

    def tick(self, sensor_name: str) -> dg.SensorExecutionData:
        sensor = self.definitions.resolve_sensor_def(sensor_name)
        cursor = self.failure_cursor if sensor_name == FAILURE_SENSOR_NAME else None
        context = dg.build_sensor_context(instance=self.instance, definitions=self.definitions, cursor=cursor)
        data = sensor.evaluate_tick(context)
        if sensor_name == FAILURE_SENSOR_NAME:
            self.failure_cursor = data.cursor
        return data

    def launch(self, request: dg.RunRequest) -> dg.ExecuteInProcessResult:
        job = self.definitions.resolve_job_def(request.job_name)
        return job.execute_in_process(
            run_config=request.run_config,
            instance=self.instance,
            tags={**request.tags, "dagster/run_key": request.run_key},
            raise_on_error=False,
        )


@pytest.fixture
def location(store_url, tmp_path: Path) -> Iterator[Location]:
    import compensation_scripts

    compensation_scripts.CALLS.clear()
    folder = tmp_path / "workflows"
    folder.mkdir()
    for spec in (SAGA, PARKED_SAGA):
        (folder / f"{spec['name']}.yaml").write_text(yaml.safe_dump(spec))
    with dg.instance_for_test() as instance:
        flow = Location(instance, workflow_definitions(folder))
        flow.tick(FAILURE_SENSOR_NAME)  # a run-status sensor starts from "now": set its cursor
        yield flow


def labels() -> list[str]:
    import compensation_scripts

    return [label for label, _ in compensation_scripts.CALLS]


def test_compensations_run_in_reverse_order_of_completion_once(location, webhook):  # noqa: F811
    import compensation_scripts

    from orchestration.kernel import audit

    failed = location.start("order_saga", order_id="A-7")
    assert not failed.success
    execution_id = failed.run_id
    assert sorted(labels()) == ["charge", "fail", "note", "reserve"] and labels()[0] == "reserve"

    (request,) = location.tick(FAILURE_SENSOR_NAME).run_requests
    assert request.run_key == f"compensate:{execution_id}"
    assert request.job_name == "order_saga_compensate"
    assert request.tags["junction/execution_id"] == execution_id and request.tags[COMPENSATING_TAG] == "true"
    assert request.tags["junction/failed_run"] == failed.run_id
    plan = request.run_config["ops"]["compensate"]["config"]["plan"]
    assert plan == ["refund", "tell_bank", "release"], "charge completed last: undone first"

    compensation = location.launch(request)
    assert compensation.success
    assert labels()[4:] == ["refund", "tell_bank", "release"]
    assert compensation_scripts.CALLS[-1] == ("release", {"undoes": "reserve"})
    outputs = {
        event.step_output_data.output_name: event.step_output_data.metadata
        for event in compensation.all_node_events
        if event.is_successful_output
    }
    assert list(outputs) == ["refund", "tell_bank", "release"]
    assert (
        outputs["refund"]["compensates"].value == "charge"
        and outputs["refund"]["status"].value == "succeeded"
    )
    assert location.instance.get_run_by_id(compensation.run_id).tags[COMPENSATING_TAG] == "true"

    # The on-failure notification, rendered with the failure, reached the receiver, recorded and audited.
    (payload,) = webhook
    assert payload["subject"] == "order_saga failed for A-7"
    assert payload["body"] == f"run {failed.run_id} failed at ship: ship: RuntimeError: no courier"
    (notified,) = audit.query(action="workflow.failure_notified")
    assert notified.details["execution_id"] == execution_id
    assert notified.details["deliveries"][0]["status"] == "delivered"
    assert audit.query(action="workflow.compensation_requested")
    assert not location.tick(FAILURE_SENSOR_NAME).run_requests, "each failure is handled once"


def test_a_failure_in_a_resumed_run_compensates_steps_of_the_earlier_run(location, monkeypatch):
    clock = Clock(monkeypatch)
    first = location.start("parked_saga")
    assert first.success and labels() == ["reserve"]
    execution_id = first.run_id
    assert not location.tick(FAILURE_SENSOR_NAME).run_requests, "a parked run has not failed"
    clock.advance(minutes=61)
    (resume,) = location.tick(RESUME_SENSOR_NAME).run_requests
    resumed = location.launch(resume)
    assert not resumed.success and labels() == ["reserve", "charge", "fail"]

    (request,) = location.tick(FAILURE_SENSOR_NAME).run_requests
    assert request.run_key == f"compensate:{execution_id}"
    assert request.run_config["ops"]["compensate"]["config"]["plan"] == ["refund", "release"]
    assert location.launch(request).success
    assert labels()[3:] == ["refund", "release"]
    checkpoint = parking.get_checkpoint(execution_id)
    assert [checkpoint.step_outputs[s]["completed"] for s in ("reserve", "charge")] == [1, 3]


def test_a_failing_compensation_does_not_stop_the_others(location, tmp_path):
    import compensation_scripts

    location.start("order_saga")
    (request,) = location.tick(FAILURE_SENSOR_NAME).run_requests
    plan = request.run_config["ops"]["compensate"]["config"]["plan"]
    # Make the first planned compensation fail: its step's recorded output is gone.
    checkpoint = parking.get_checkpoint(request.tags["junction/execution_id"])
    broken = {**checkpoint.step_outputs}
    broken["charge"] = {**broken["charge"], "state": {"output": {}, "status": "succeeded"}}
    from orchestration.store.db import session_scope
    from orchestration.store.models import WorkflowCheckpoint

    with session_scope() as session:
        session.get(WorkflowCheckpoint, checkpoint.execution_id).step_outputs = broken
    compensation = location.launch(request)
    assert not compensation.success
    assert [label for label, _ in compensation_scripts.CALLS][-1] == "release", "the last one still ran"
    failure = compensation.get_step_failure_events()[0]
    assert (
        "compensation(s) failed: refund, tell_bank"
        in failure.event_specific_data.user_failure_data.description
    )
    assert plan == ["refund", "tell_bank", "release"]


def test_a_workflow_without_compensation_or_on_failure_has_no_failure_sensor(tmp_path):
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump({"name": "plain", "steps": [script("only")]}))
    definitions = workflow_definitions(tmp_path)
    assert not list(definitions.sensors or [])
    assert [job.name for job in definitions.jobs] == ["plain"]


def test_on_failure_templates_are_checked_at_load_time():
    from orchestration.kernel.spec_errors import SpecError
    from orchestration.workflows.spec import parse_workflow

    spec = {
        **SAGA,
        "on_failure": [
            {"channel": "x", "subject": "{{ failure.why }}", "body": "{{ steps.reserve.output }}"}
        ],
    }
    with pytest.raises(SpecError) as raised:
        parse_workflow(spec)
    assert "on_failure[0].subject: unknown variable 'failure.why'" in str(raised.value)
    assert "on_failure[0].body: 'steps.reserve.output': on_failure cannot read step outputs" in str(
        raised.value
    )


def test_the_shipped_examples_have_their_compensation_job_sensors_and_schedule():
    from orchestration.settings import PROJECT_ROOT

    definitions = workflow_definitions(PROJECT_ROOT / "orchestration" / "workflows")
    compensation = definitions.resolve_job_def("order_approval_compensate")
    assert set(compensation.nodes[0].definition.output_dict) == {"release_hold", "tell_finance_rolled_back"}
    assert "notifications" in compensation.resource_defs
    failures = definitions.resolve_sensor_def(FAILURE_SENSOR_NAME)
    assert failures.default_status == dg.DefaultSensorStatus.RUNNING
    resume = definitions.resolve_sensor_def(RESUME_SENSOR_NAME)
    assert {target.job_name for target in resume.targets} >= {"order_approval", "nightly_flights_report"}
    schedule = definitions.resolve_schedule_def("nightly_flights_report_schedule")
    assert schedule.cron_schedule == "0 5 * * *"
    job = definitions.resolve_job_def("order_approval")
    assert {node.name for node in job.nodes} == {
        "lookup_order",
        "has_amount",
        "sign_off",
        "refresh_flights",
        "notify_finance",
    }


# --- On-failure notifications exactly once, across sensor crashes ----------------------------------


def test_a_tick_repeated_after_a_crash_does_not_notify_again(location, webhook):  # noqa: F811
    """The sensor notified, then crashed before its cursor was saved: the next tick sees the same
    failed run again, finds the delivery claimed and settled, and sends nothing."""
    from orchestration.kernel import audit
    from orchestration.store import session_scope
    from orchestration.store.models import NotificationDelivery

    failed = location.start("order_saga", order_id="A-7")
    cursor_before = location.failure_cursor
    (request,) = location.tick(FAILURE_SENSOR_NAME).run_requests
    location.failure_cursor = cursor_before  # the crash: the tick's cursor never reached storage
    (again,) = location.tick(FAILURE_SENSOR_NAME).run_requests
    assert again.run_key == request.run_key, "the compensation run is deduplicated by its run key"
    assert len(webhook) == 1, "the notification was not sent again"
    with session_scope() as session:
        (row,) = session.query(NotificationDelivery).all()
    assert (row.status, row.resends) == ("delivered", 0)
    assert row.dedupe_key == f"workflow-failure:{failed.run_id}:{failed.run_id}:0:finance"
    assert len(audit.query(action="workflow.failure_notified")) == 1


CRASHING_SENDER = """
import logging, sys

import dagster as dg
import yaml

from orchestration.workflows.compensation import notify_failure
from orchestration.workflows.spec import parse_workflow

spec = parse_workflow(yaml.safe_load(open(sys.argv[1])), sys.argv[1])
run = dg.DagsterRun(job_name=spec.name, run_id=sys.argv[2], run_config={"order_id": "A-7"})
notify_failure(spec, run, "ship: no courier", ["ship"], logging.getLogger("sensor"))
"""


@pytest.fixture
def hanging_webhook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store_url: str):
    """Channel `finance` -> a receiver that takes the first request and never answers it (the sender
    dies waiting); later requests are answered. Yields (delivery ids received, first-request event)."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from orchestration.settings import reset_settings_cache

    received: list[str] = []
    first_arrived, release = threading.Event(), threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's hook name
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            received.append(self.headers["X-Junction-Delivery"])
            if len(received) == 1:
                first_arrived.set()
                release.wait(60)
                return
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format, *args) -> None:  # noqa: A002 - keep test output quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    channels = tmp_path / "channels.yaml"
    hook = {
        "kind": "webhook",
        "url": f"http://127.0.0.1:{server.server_address[1]}/hook",
        "secret_env": SECRET_ENV,
        "timeout_s": 60,
        "retry": {"max_attempts": 1},
    }
    channels.write_text(json.dumps({"channels": {"finance": hook}}))
    monkeypatch.setenv(SECRET_ENV, SECRET)
    monkeypatch.setenv("JUNCTION_CHANNELS_FILE", str(channels))
    reset_settings_cache()
    try:
        yield received, first_arrived
    finally:
        release.set()
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_send_interrupted_by_a_crash_is_visible_and_sent_again_with_the_same_id(
    hanging_webhook, tmp_path, caplog
):
    """The sender dies (SIGKILL) while the receiver holds its request: the claim stays `sending` in the
    store, where it can be seen; the next tick sends it again with the same delivery id (the
    receiver's dedupe key) and counts the resend; a third sends nothing."""
    import logging
    import subprocess
    import sys

    from orchestration.store import session_scope
    from orchestration.store.models import NotificationDelivery
    from orchestration.workflows.compensation import notify_failure
    from orchestration.workflows.spec import parse_workflow

    received, first_arrived = hanging_webhook
    spec_file = tmp_path / "order_saga.yaml"
    spec_file.write_text(yaml.safe_dump(SAGA))
    (tmp_path / "sender.py").write_text(CRASHING_SENDER)
    sender = subprocess.Popen([sys.executable, str(tmp_path / "sender.py"), str(spec_file), "run-1"])
    try:
        wait_until(lambda: first_arrived.is_set() or sender.poll() is not None, 120, "the sender's request")
        assert first_arrived.is_set(), f"the sender exited with {sender.returncode} before sending"
    finally:
        sender.kill()
        sender.wait()

    def stored() -> list[NotificationDelivery]:
        with session_scope() as session:
            return session.query(NotificationDelivery).all()

    (claim,) = stored()
    assert (claim.status, claim.channel, claim.resends) == ("sending", "finance", 0), "visible, not lost"
    assert claim.message_id == received[0]

    spec = parse_workflow(yaml.safe_load(spec_file.read_text()), str(spec_file))
    run = dg.DagsterRun(job_name=spec.name, run_id="run-1", run_config={"order_id": "A-7"})
    with caplog.at_level(logging.WARNING):
        (record,) = notify_failure(spec, run, "ship: no courier", ["ship"], logging.getLogger("sensor"))
    assert "never settled (a crash interrupted the send)" in caplog.text
    assert received == [claim.message_id, claim.message_id], "sent again, with the same delivery id"
    assert (record.status, record.resends, record.id) == ("delivered", 1, claim.id)
    (row,) = stored()
    assert (row.status, row.resends, row.created_at) == ("delivered", 1, claim.created_at)

    assert notify_failure(spec, run, "ship: no courier", ["ship"], logging.getLogger("sensor")) == []
    assert len(received) == 2, "settled: not sent a third time"
