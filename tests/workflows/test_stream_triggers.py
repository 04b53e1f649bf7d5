"""Stream-triggered workflows: a spec's `triggers: [{type: stream}]` becomes a streaming sensor with a
`WorkflowTarget`; each matching event becomes exactly one execution whose run reads the event itself
(`trigger.event`). Real event streams (SQL backend on SQLite and PostgreSQL, and Redis) and the
sensor evaluated as the daemon does, with its run-key deduplication."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dagster as dg
import pytest
import yaml
from dagster._core.storage.tags import RUN_KEY_TAG, SENSOR_NAME_TAG
from dagster._daemon.sensor import fetch_existing_runs

from orchestration.kernel.spec_errors import SpecError
from orchestration.settings import reset_settings_cache
from orchestration.workflows import parking
from orchestration.workflows.factory import workflow_definitions
from orchestration.workflows.resume import RESUME_SENSOR_NAME
from orchestration.workflows.spec import parse_workflow
from resources.event_stream import StreamRegistry, StreamSpec, open_event_stream
from sensors.event_triggers import FIRST_ID_TAG, STREAM_TAG

SENSOR = "order_echo_on_orders"


def echo_workflow(**trigger: Any) -> dict[str, Any]:
    return {
        "name": "order_echo",
        "inputs": {"channel": {"type": "string", "default": "web"}},
        "triggers": [
            {"type": "stream", "stream": "orders", "filter": {"field": "amount", "op": "gt", "value": 100}}
            | trigger
        ],
        "steps": [
            {
                "id": "echo",
                "type": "custom_script",
                "config": {
                    "callable": "workflow_scripts:echo",
                    "arguments": {
                        "order": "{{ trigger.event.payload.order_id }}",
                        "event": "{{ trigger.event.stream }}/{{ trigger.event.id }}",
                        "channel": "{{ inputs.channel }}",
                    },
                },
            }
        ],
    }


@pytest.fixture(params=["sql", "redis"])
def orders_stream(request, store_url, monkeypatch):
    """The `orders` stream declared in the platform store, on the SQL backend or on Redis."""
    from orchestration.store.db import get_engine

    if request.param == "redis":
        monkeypatch.setenv("JUNCTION_REDIS_URL", request.getfixturevalue("clean_redis_url"))
        reset_settings_cache()
    StreamRegistry(get_engine(store_url)).upsert(StreamSpec(name="orders"))
    return request.param


def definitions(tmp_path: Path, spec: dict[str, Any]) -> dg.Definitions:
    (tmp_path / f"{spec['name']}.yaml").write_text(yaml.safe_dump(spec))
    return workflow_definitions(tmp_path)


def publish(*payloads: dict[str, Any]) -> list[str]:
    with open_event_stream() as events:
        return [result.id for result in events.publish_batch("orders", list(payloads)).results]


def tick(defs: dg.Definitions, instance, cursor: str | None) -> dg.SensorResult:
    sensor = defs.resolve_sensor_def(SENSOR)
    context = dg.build_sensor_context(instance=instance, cursor=cursor, sensor_name=SENSOR, definitions=defs)
    return sensor.evaluate_tick(context)


def launch(defs: dg.Definitions, instance, run_requests) -> list[dg.ExecuteInProcessResult]:
    """Run what the daemon would launch: nothing for a run key this sensor already used."""
    existing = fetch_existing_runs(instance, SimpleNamespace(name=SENSOR), run_requests)
    job = defs.resolve_job_def("order_echo")
    return [
        job.execute_in_process(
            run_config=request.run_config,
            instance=instance,
            tags={**request.tags, RUN_KEY_TAG: request.run_key, SENSOR_NAME_TAG: SENSOR},
        )
        for request in run_requests
        if request.run_key not in existing
    ]


def test_one_event_one_execution_reading_its_event(orders_stream, tmp_path, instance):
    defs = definitions(tmp_path, echo_workflow())
    ids = publish(
        {"order_id": "A-1", "amount": 250},
        {"order_id": "A-2", "amount": 50},  # filtered out
        {"order_id": "A-3", "amount": 900},
    )
    first = tick(defs, instance, cursor=None)
    assert [r.run_key for r in first.run_requests] == [f"evt:orders:{ids[0]}", f"evt:orders:{ids[2]}"]
    # The run gets the stream and the id, never the payload.
    assert all("A-" not in str(r.run_config) for r in first.run_requests)
    results = launch(defs, instance, first.run_requests)
    assert [result.success for result in results] == [True, True]

    # The daemon died before saving the cursor: the same keys again, and nothing is launched twice.
    again = tick(defs, instance, cursor=None)
    assert [r.run_key for r in again.run_requests] == [r.run_key for r in first.run_requests]
    assert launch(defs, instance, again.run_requests) == []
    assert len(instance.get_runs()) == 2

    outputs = [result.output_for_node("echo")["echo"]["output"] for result in results]
    assert [o["arguments"]["order"] for o in outputs] == ["A-1", "A-3"]
    assert outputs[0]["arguments"]["event"] == f"orders/{ids[0]}"
    assert outputs[0]["arguments"]["channel"] == "web", "inputs take their defaults"
    assert outputs[0]["trigger"]["event"]["payload"] == {"order_id": "A-1", "amount": 250}
    # Each event is its own execution; the execution id is on the run from the start.
    executions = {run.tags["junction/execution_id"] for run in instance.get_runs()}
    assert len(executions) == 2 and {o["execution"] for o in outputs} == executions
    run = instance.get_run_by_id(results[0].run_id)
    assert (run.tags[STREAM_TAG], run.tags[FIRST_ID_TAG]) == ("orders", ids[0])
    assert run.tags["junction/workflow"] == "order_echo"

    # With the cursor saved, only new events start executions.
    more = publish({"order_id": "A-4", "amount": 101})
    later = tick(defs, instance, cursor=first.cursor)
    assert [r.run_key for r in later.run_requests] == [f"evt:orders:{more[0]}"]
    assert len(launch(defs, instance, later.run_requests)) == 1


def test_a_run_whose_event_is_gone_fails_naming_it(store_url, tmp_path, instance):
    from orchestration.store.db import get_engine

    StreamRegistry(get_engine(store_url)).upsert(StreamSpec(name="orders"))
    defs = definitions(tmp_path, echo_workflow())
    job = defs.resolve_job_def("order_echo")
    result = job.execute_in_process(
        instance=instance,
        tags={STREAM_TAG: "orders", FIRST_ID_TAG: "1-0", "junction/events_last": "1-0"},
        raise_on_error=False,
    )
    assert not result.success
    failure = result.get_step_failure_events()[0].event_specific_data.error.to_string()
    assert "event 1-0 of stream 'orders' is no longer in the stream" in failure


def test_the_shipped_event_triggered_example(store_url, junction_home, instance, monkeypatch, api_server):
    """VIP order -> sales told -> parked on the Delay for a day -> (a day later) the resume sensor
    wakes it -> the order service says unpaid -> sales is reminded."""
    from orchestration.store.db import get_engine
    from resources.event_stream import load_stream_specs

    registry = StreamRegistry(get_engine(store_url))
    streams_dir = Path(__file__).parents[2] / "sensors/streams"
    for spec in load_stream_specs(streams_dir).values():
        registry.upsert(spec)
    defs = workflow_definitions(Path(__file__).parents[2] / "orchestration/workflows")
    sensor_name = "large_order_follow_up_on_orders"
    sensor = defs.resolve_sensor_def(sensor_name)
    order = {
        "order_id": "o-9",
        "customer_id": "c-1",
        "amount": 7200,
        "currency": "EUR",
        "items": [{"sku": "s", "quantity": 2}],
    }
    ids = publish({**order, "order_id": "o-8", "amount": 20}, order)
    context = dg.build_sensor_context(instance=instance, sensor_name=sensor_name, definitions=defs)
    (request,) = sensor.evaluate_tick(context).run_requests
    assert request.run_key == f"evt:orders:{ids[1]}"
    job = defs.resolve_job_def("large_order_follow_up")
    run_config = {"orders_api": api_server.url}
    result = job.execute_in_process(run_config=run_config, instance=instance, tags=request.tags)
    assert result.success
    assert result.output_for_node("order_lines")["order_lines"]["output"]["records"] == [
        {"sku": "s", "quantity": 2}
    ]
    # The shipped `sales` channel is an outbox under JUNCTION_HOME: the VIP order's message lands there.
    tell_sales = result.output_for_node("tell_sales")["tell_sales"]
    assert tell_sales["output"]["status"] == "delivered"
    (line,) = (junction_home / "outbox" / "sales.jsonl").read_text().splitlines()
    assert json.loads(line)["subject"] == "VIP order o-9: 7200 EUR"

    # The Delay parked the execution: the run ended, nothing waits in a worker, the order is unchecked.
    parked = instance.get_run_by_id(result.run_id)
    assert parked.tags[parking.STATE_TAG] == parking.WAITING
    assert parked.tags[parking.PARKED_STEP_TAG] == "wait_a_day"
    assert api_server.requests == []
    resume_sensor = defs.resolve_sensor_def(RESUME_SENSOR_NAME)

    def resume_requests() -> list[dg.RunRequest]:
        context = dg.build_sensor_context(instance=instance, sensor_name=RESUME_SENSOR_NAME, definitions=defs)
        return list(resume_sensor.evaluate_tick(context).run_requests or [])

    assert resume_requests() == [], "a day has not passed"
    a_day_later = parking.utc_now() + timedelta(days=1, minutes=1)
    monkeypatch.setattr(parking, "utc_now", lambda: a_day_later)
    (resume,) = resume_requests()
    api_server.answer("/orders/o-9", 200, {"status": "unpaid"})
    resumed = job.execute_in_process(
        run_config=resume.run_config, instance=instance, tags={**resume.tags, RUN_KEY_TAG: resume.run_key}
    )
    assert resumed.success
    assert [request.path for request in api_server.requests] == ["/orders/o-9"]
    assert resumed.output_for_node("unpaid", "then")  # the branch taken
    reminder = json.loads((junction_home / "outbox" / "sales.jsonl").read_text().splitlines()[1])
    assert reminder["subject"] == "Order o-9 still unpaid after a day"
    assert "is unpaid." in reminder["body"]
    assert resume_requests() == [], "finished: nothing left to resume"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda spec: spec.update(triggers=[{"type": "manual"}]),
            "flow.yaml: steps[0].config.arguments.order: 'trigger.event.payload.order_id': "
            "only a workflow with a stream trigger has trigger.event",
        ),
        (
            lambda spec: spec["inputs"]["channel"].pop("default"),
            "inputs.channel: a stream-triggered workflow needs a default for every input",
        ),
        (
            lambda spec: spec["triggers"][0].update(filter={"field": "amount", "op": "bigger", "value": 1}),
            "triggers[0].filter",
        ),
        (
            lambda spec: spec["steps"][0]["config"]["arguments"].update(x="{{ trigger.event.body }}"),
            "an event offers stream, id, time, payload",
        ),
    ],
)
def test_spec_errors(change, message):
    spec = echo_workflow()
    change(spec)
    with pytest.raises(SpecError) as raised:
        parse_workflow(spec, "flow.yaml")
    assert message in str(raised.value)
