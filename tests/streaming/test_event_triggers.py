"""Stream triggers: events become runs exactly once, with deterministic batches and loud gaps.

The sensors are evaluated as the daemon does (`evaluate_tick` on a `build_sensor_context` with a
persistent instance), and their run requests are launched with the daemon's own run-key lookup
(`fetch_existing_runs`), so a re-evaluation after a lost cursor shows what Dagster would launch.
"""

# No `from __future__ import annotations`: Dagster reads the op's config annotation at definition time.

import time
from types import SimpleNamespace

import dagster as dg
import pytest
from dagster._core.storage.tags import RUN_KEY_TAG, SENSOR_NAME_TAG
from dagster._daemon.sensor import fetch_existing_runs

from orchestration.kernel.spec_errors import SpecError
from resources.event_stream import EventId, EventStream, StreamSpec
from sensors.event_triggers import (
    COUNT_TAG,
    FIRST_ID_TAG,
    LAST_ID_TAG,
    STREAM_TAG,
    TRIGGER_METADATA,
    AssetSelectionTarget,
    CountBatches,
    EachEvent,
    EventRange,
    EventRangeConfig,
    JobTarget,
    LaunchedJob,
    StreamSensorEventsLost,
    StreamTrigger,
    TimeWindows,
    TriggerCursor,
    WorkflowTarget,
    event_trigger_sensors,
    pipeline_triggers,
)

handled: list[list[str]] = []


@dg.op
def handle_orders(config: EventRangeConfig) -> None:
    from resources.event_stream import open_event_stream

    with open_event_stream() as events:
        handled.append([event.id for event in config.read(events)])


@dg.job
def orders_job() -> None:
    handle_orders()


def trigger(mode=None, **options) -> StreamTrigger:
    return StreamTrigger(
        name="orders_trigger",
        stream="orders",
        target=JobTarget(orders_job, config_op="handle_orders"),
        mode=mode or EachEvent(),
        **options,
    )


@pytest.fixture
def orders(declare, event_stream: EventStream) -> EventStream:
    declare("orders")
    return event_stream


@pytest.fixture
def instance():
    with dg.instance_for_test() as test_instance:
        yield test_instance


def evaluate(sensor: dg.SensorDefinition, instance, cursor: str | None):
    context = dg.build_sensor_context(instance=instance, cursor=cursor, sensor_name=sensor.name)
    return sensor.evaluate_tick(context)


def launch(instance, sensor: dg.SensorDefinition, run_requests) -> list[str]:
    """Create runs as the daemon does: skip every request whose run key this sensor already used."""
    existing = fetch_existing_runs(instance, SimpleNamespace(name=sensor.name), run_requests)
    launched = []
    for request in run_requests:
        if request.run_key in existing:
            continue
        tags = {**request.tags, RUN_KEY_TAG: request.run_key, SENSOR_NAME_TAG: sensor.name}
        run = instance.create_run_for_job(orders_job, run_config=request.run_config, tags=tags)
        launched.append(run.run_id)
    return launched


def publish(events: EventStream, *payloads) -> list[str]:
    return [result.id for result in events.publish_batch("orders", list(payloads)).results]


def run_keys(instance) -> list[str]:
    return sorted(run.tags[RUN_KEY_TAG] for run in instance.get_runs())


@pytest.mark.parametrize(
    "mode, expected_keys",
    [
        (EachEvent(), lambda ids: [f"evt:orders:{i}" for i in ids]),
        (CountBatches(3), lambda ids: [f"batch:orders:{ids[0]}", f"batch:orders:{ids[3]}"]),
    ],
    ids=["each-event", "batches"],
)
def test_a_crash_between_launch_and_cursor_save_launches_nothing_twice(
    orders, instance, monkeypatch, mode, expected_keys
):
    monkeypatch.setattr(type(orders), "close", lambda self: None)  # the sensor shares the test's stream
    sensor = trigger(mode).sensor(open_events=lambda: orders)
    ids = publish(orders, *({"n": n} for n in range(7)))

    first = evaluate(sensor, instance, cursor=None)
    assert len(launch(instance, sensor, first.run_requests)) == len(expected_keys(ids))
    # The daemon died before saving `first.cursor`: the next tick starts from the old cursor again.
    again = evaluate(sensor, instance, cursor=None)
    assert [r.run_key for r in again.run_requests] == [r.run_key for r in first.run_requests]
    assert launch(instance, sensor, again.run_requests) == []
    assert run_keys(instance) == sorted(expected_keys(ids))

    # With the cursor saved, the next tick launches only what is new.
    more = publish(orders, *({"n": n} for n in range(7, 9)))
    after_save = evaluate(sensor, instance, cursor=first.cursor)
    launch(instance, sensor, after_save.run_requests)
    if isinstance(mode, EachEvent):
        assert [r.run_key for r in after_save.run_requests] == [f"evt:orders:{i}" for i in more]
    else:  # the open batch (ids[6]) completes with the two new events
        assert [r.run_key for r in after_save.run_requests] == [f"batch:orders:{ids[6]}"]
        assert after_save.run_requests[0].tags[COUNT_TAG] == "3"
        assert after_save.run_requests[0].tags[LAST_ID_TAG] == more[-1]


def test_runs_get_the_id_range_and_stream_never_the_payloads(orders):
    ids = publish(orders, *({"order_id": f"o{n}", "blob": "x" * 1000} for n in range(4)))
    ranges, _ = trigger(CountBatches(2)).evaluate_tick(orders, TriggerCursor())
    request = trigger(CountBatches(2)).run_request(ranges[1])
    assert request.tags[STREAM_TAG] == "orders"
    assert (request.tags[FIRST_ID_TAG], request.tags[LAST_ID_TAG]) == (ids[2], ids[3])
    config = request.run_config["ops"]["handle_orders"]["config"]
    assert config == {
        "stream": "orders",
        "first_id": ids[2],
        "last_id": ids[3],
        "count": 2,
        "condition_json": None,
    }
    assert "blob" not in str(request.run_config)
    read = list(EventRangeConfig(**config).read(orders))
    assert [event.id for event in read] == ids[2:4]


@pytest.mark.parametrize("tick_size", [1, 2, 3, 5, 7, 100])
def test_batch_boundaries_do_not_depend_on_tick_sizes(orders, tick_size):
    ids = publish(orders, *({"n": n} for n in range(11)))
    reference = [f"batch:orders:{ids[i]}" for i in (0, 4)]
    batches = trigger(CountBatches(4), max_events_per_tick=tick_size)
    cursor, keys = TriggerCursor(), []
    for _ in range(20):
        ranges, cursor = batches.evaluate_tick(orders, cursor)
        keys += [r.run_key for r in ranges]
        cursor = TriggerCursor.parse(cursor.serialize())  # the cursor survives as the daemon stores it
    assert keys == reference
    assert (cursor.open.first_id, cursor.open.count) == (ids[8], 3)  # waits for a fourth event


def test_a_window_is_emitted_only_once_it_closed(orders):
    windows = trigger(TimeWindows(1, grace_seconds=0.5))
    while time.time() % 1 > 0.3:  # publish early in a second, so both events share one window
        time.sleep(0.01)
    first = publish(orders, {"n": 0}, {"n": 1})
    start = EventId.parse(first[0]).ms // 1000 * 1000

    ranges, cursor = windows.evaluate_tick(orders, TriggerCursor(), now_ms=lambda: start + 900)
    assert ranges == []
    assert (cursor.open.window_start, cursor.open.count, cursor.after) == (start, 2, first[1])
    # Past the end, but within the grace a publisher with a late clock may still add to it.
    ranges, _ = windows.evaluate_tick(orders, cursor, now_ms=lambda: start + 1499)
    assert ranges == []
    ranges, closed = windows.evaluate_tick(orders, cursor, now_ms=lambda: start + 1500)
    assert [(r.run_key, r.first_id, r.last_id, r.count) for r in ranges] == [
        (f"window:orders:{start}", first[0], first[1], 2)
    ]
    assert closed.open is None

    # An event of a later window closes the open one without waiting for the clock.
    time.sleep(max(0.0, (start + 1050) / 1000 - time.time()))
    later = publish(orders, {"n": 2})
    ranges, cursor = windows.evaluate_tick(orders, TriggerCursor(), now_ms=lambda: start + 1000)
    assert [(r.run_key, r.count) for r in ranges] == [(f"window:orders:{start}", 2)]
    assert (cursor.open.first_id, cursor.open.count) == (later[0], 1)


def test_a_gap_fails_the_tick_naming_the_range(declare, event_stream, instance, monkeypatch):
    monkeypatch.setattr(type(event_stream), "close", lambda self: None)
    declare("orders", retention={"max_count": 2})
    ids = [event_stream.publish("orders", {"n": n}).id for n in range(5)]
    event_stream.trim("orders")
    sensor = trigger().sensor(open_events=lambda: event_stream)

    cursor = TriggerCursor(after=ids[0]).serialize()
    with pytest.raises(Exception, match=rf"events {EventId.parse(ids[0]).next()} \.\. {ids[2]}") as failed:
        evaluate(sensor, instance, cursor)
    assert "orders_trigger" in str(failed.value)
    with pytest.raises(StreamSensorEventsLost) as lost:
        trigger().evaluate_tick(event_stream, TriggerCursor.parse(cursor))
    assert (lost.value.from_id, lost.value.to_id) == (str(EventId.parse(ids[0]).next()), ids[2])


def test_the_filter_applies_per_event_and_per_batch(orders):
    condition = {"field": "amount", "op": "gt", "value": 100}
    ids = publish(orders, {"amount": 50}, {"amount": 150}, [1, 2], {"amount": 500}, {"amount": 101})
    each, _ = trigger(condition=condition).evaluate_tick(orders, TriggerCursor())
    assert [r.first_id for r in each] == [ids[1], ids[3], ids[4]]

    batches = trigger(CountBatches(2), condition=condition)
    ranges, cursor = batches.evaluate_tick(orders, TriggerCursor())
    assert [(r.first_id, r.last_id, r.count) for r in ranges] == [(ids[1], ids[3], 2)]
    assert cursor.open.first_id == ids[4]
    # The run reads its range and sees only the matching events of it.
    config = batches.run_request(ranges[0]).run_config["ops"]["handle_orders"]["config"]
    assert [e.id for e in EventRangeConfig(**config).read(orders)] == [ids[1], ids[3]]


def test_a_bad_filter_fails_at_load():
    with pytest.raises(Exception, match="op"):
        trigger(condition={"field": "amount", "op": "bigger", "value": 1})


def test_replays_have_their_own_run_key_namespace(orders):
    ids = publish(orders, *({"n": n} for n in range(3)))
    requests = trigger().replay_run_requests(orders, ids[1], ids[2], replay_id="r1")
    assert [r.run_key for r in requests] == [f"replay:r1:evt:orders:{i}" for i in ids[1:]]
    assert requests[0].tags["junction/replay"] == "r1"


@pytest.mark.parametrize("mode", [EachEvent(), CountBatches(2), TimeWindows(60, grace_seconds=1.5)])
def test_the_sensor_metadata_rebuilds_the_trigger_for_replays(orders, mode):
    condition = {"field": "n", "op": "gt", "value": 0}
    original = trigger(mode, condition=condition, tags={"team": "sales"})
    recorded = original.sensor().metadata[TRIGGER_METADATA].data
    assert recorded["stream"] == "orders" and recorded["target"] == {
        "kind": "job",
        "config_op": "handle_orders",
    }
    rebuilt = StreamTrigger.from_metadata(original.name, recorded, "orders_job")
    assert rebuilt.mode == mode
    ids = publish(orders, *({"n": n} for n in range(5)))
    expected = original.replay_run_requests(orders, ids[0], ids[-1], replay_id="r")
    got = rebuilt.replay_run_requests(orders, ids[0], ids[-1], replay_id="r")
    assert [(r.run_key, r.run_config, r.tags) for r in got] == [
        (r.run_key, r.run_config, r.tags) for r in expected
    ]
    assert rebuilt.target.job.name == "orders_job"


def test_a_workflow_trigger_is_rebuilt_for_replays_as_new_executions(orders):
    workflow = StreamTrigger(
        name="follow_up_on_orders",
        stream="orders",
        target=WorkflowTarget(orders_job, inputs={"threshold": 100}),
    )
    recorded = workflow.sensor().metadata[TRIGGER_METADATA].data
    assert recorded["target"] == {"kind": "workflow", "inputs": {"threshold": 100}}
    rebuilt = StreamTrigger.from_metadata(workflow.name, recorded, "orders_job")
    assert isinstance(rebuilt.target, WorkflowTarget) and rebuilt.target.job == LaunchedJob("orders_job")
    ids = publish(orders, {"n": 1}, {"n": 2})
    expected = workflow.replay_run_requests(orders, ids[0], ids[-1], replay_id="r")
    got = rebuilt.replay_run_requests(orders, ids[0], ids[-1], replay_id="r")
    assert [(r.run_key, r.run_config, r.tags) for r in got] == [
        (r.run_key, r.run_config, r.tags) for r in expected
    ]
    # A replay is a new execution of its own, not the original event's execution again.
    original = workflow.evaluate_tick(orders, TriggerCursor())[0]
    original_ids = {workflow.run_request(r).tags["junction/execution_id"] for r in original}
    assert original_ids.isdisjoint(r.tags["junction/execution_id"] for r in got)


def test_a_triggered_run_reads_its_events(orders, instance, monkeypatch):
    monkeypatch.setattr(type(orders), "close", lambda self: None)
    monkeypatch.setattr("resources.event_stream.open_event_stream", lambda *a, **k: orders)
    ids = publish(orders, *({"n": n} for n in range(4)))
    ranges, _ = trigger(CountBatches(2)).evaluate_tick(orders, TriggerCursor())
    handled.clear()
    request = trigger(CountBatches(2)).run_request(ranges[1])
    assert orders_job.execute_in_process(run_config=request.run_config, instance=instance).success
    assert handled == [ids[2:4]]


def test_asset_selection_targets_and_sensor_settings():
    @dg.asset
    def order_totals() -> None: ...

    sensor = StreamTrigger(
        name="totals_on_orders",
        stream="orders",
        target=AssetSelectionTarget(dg.AssetSelection.assets(order_totals), name="order totals"),
        minimum_interval_seconds=5,
    ).sensor()
    repository = dg.Definitions(assets=[order_totals], sensors=[sensor]).get_repository_def()
    loaded = repository.get_sensor_def("totals_on_orders")
    assert loaded.minimum_interval_seconds == 5
    assert loaded.default_status == dg.DefaultSensorStatus.RUNNING
    job = repository.get_job(loaded.job_name)
    assert job.asset_layer.executable_asset_keys == {dg.AssetKey("order_totals")}
    with pytest.raises(ValueError, match="unique"):
        event_trigger_sensors([trigger(), trigger()])


def test_a_backlog_is_paged_across_ticks_with_the_same_run_keys(orders):
    ids = publish(orders, *({"n": n} for n in range(5)))
    paged = trigger(max_runs_per_tick=2)
    cursor, per_tick = TriggerCursor(), []
    for _ in range(4):
        ranges, cursor = paged.evaluate_tick(orders, cursor)
        per_tick.append([r.run_key for r in ranges])
    assert per_tick == [[f"evt:orders:{i}" for i in chunk] for chunk in (ids[:2], ids[2:4], ids[4:])] + [[]]


def test_a_window_is_not_closed_by_the_clock_before_the_backlog_is_read(orders):
    while time.time() % 1 > 0.3:
        time.sleep(0.01)
    ids = publish(orders, *({"n": n} for n in range(3)))
    start = EventId.parse(ids[0]).ms // 1000 * 1000
    windows = trigger(TimeWindows(1, grace_seconds=0), max_events_per_tick=2)
    late_clock = lambda: start + 60_000  # noqa: E731
    ranges, cursor = windows.evaluate_tick(orders, TriggerCursor(), now_ms=late_clock)
    assert ranges == [] and cursor.open.count == 2  # the third event of the window is still unread
    ranges, cursor = windows.evaluate_tick(orders, cursor, now_ms=late_clock)
    assert [(r.run_key, r.count) for r in ranges] == [(f"window:orders:{start}", 3)]


def test_events_of_a_window_already_closed_get_a_run_of_their_own(orders):
    while time.time() % 1 > 0.3:
        time.sleep(0.01)
    ids = publish(orders, {"n": 0}, {"n": 1})
    start = EventId.parse(ids[0]).ms // 1000 * 1000
    # As if the clock closed this window before these events were read (a publisher's late clock).
    closed = TriggerCursor(closed_window=start)
    ranges, cursor = trigger(TimeWindows(1, grace_seconds=0)).evaluate_tick(
        orders, closed, now_ms=lambda: start + 5000
    )
    assert [r.run_key for r in ranges] == [f"window:orders:{start}:late:{ids[0]}"]
    assert TriggerCursor.parse(cursor.serialize()).closed_window == start


PIPELINE = """
source: {format: csv, path: orders.csv}
group: sales
triggers:
  - stream: orders
    condition: {field: amount, op: gt, value: 100}
    max_events_per_run: 50
  - stream: refunds
    debounce_seconds: 300
  - stream: returns
    minimum_interval_seconds: 2
  - stream: platform.runs
    condition: {field: status, op: eq, value: failed}
  - stream: platform_runs
"""


def test_pipeline_spec_triggers_become_sensors(tmp_path):
    (tmp_path / "sales.yaml").write_text(PIPELINE)
    triggers = {t.name: t for t in pipeline_triggers(tmp_path)}
    # Dotted stream names give valid Dagster names; two triggers that would share one get their index.
    assert set(triggers) == {
        "sales_on_orders",
        "sales_on_refunds",
        "sales_on_returns",
        "sales_on_platform_runs_3",
        "sales_on_platform_runs_4",
    }
    assert triggers["sales_on_platform_runs_3"].stream == "platform.runs"
    assert triggers["sales_on_platform_runs_4"].stream == "platform_runs"
    sensors = {sensor.name: sensor for sensor in event_trigger_sensors(list(triggers.values()))}
    assert sensors["sales_on_returns"].minimum_interval_seconds == 2
    assert sensors["sales_on_orders"].minimum_interval_seconds == 5, "the documented default"
    orders_trigger = triggers["sales_on_orders"]
    assert orders_trigger.mode == CountBatches(50)
    assert orders_trigger.condition == {"field": "amount", "op": "gt", "value": 100}
    assert triggers["sales_on_refunds"].mode == TimeWindows(300)
    assert triggers["sales_on_returns"].mode == EachEvent()
    assert orders_trigger.target.selection == dg.AssetSelection.groups("sales")
    assert (
        orders_trigger.run_request(EventRange("k", "orders", "1-0", "1-0", 1)).tags["junction/pipeline"]
        == "sales"
    )


@pytest.mark.parametrize(
    "field, value, reason",
    [
        ("minimum_interval_seconds", 0, "greater than or equal to 1"),
        ("stream", "Platform Runs", "should match pattern"),
    ],
)
def test_bad_trigger_options_fail_at_load_naming_the_field(tmp_path, field, value, reason):
    (tmp_path / "sales.yaml").write_text(
        "source: {format: csv, path: orders.csv}\n"
        f"triggers:\n  - stream: orders\n    {field}: {value!r}\n".replace(
            "stream: orders\n    stream", "stream"
        )
    )
    with pytest.raises(SpecError, match=rf"sales.yaml: triggers\[0\]\.{field}: .*{reason}"):
        pipeline_triggers(tmp_path)


def test_python_triggers_default_to_a_short_interval():
    assert trigger().sensor().minimum_interval_seconds == 5
    assert trigger(minimum_interval_seconds=1).sensor().minimum_interval_seconds == 1


def test_a_trigger_cannot_both_count_and_window(tmp_path):
    spec = tmp_path / "sales.yaml"
    spec.write_text(
        PIPELINE.replace("max_events_per_run: 50", "max_events_per_run: 50\n    debounce_seconds: 5")
    )
    with pytest.raises(SpecError, match=r"sales.yaml: triggers\[0\]: set either max_events_per_run"):
        pipeline_triggers(tmp_path)


@pytest.mark.parametrize("event_stream", ["sqlite"], indirect=True)
def test_an_unreachable_redis_fails_the_tick(event_stream, instance):
    from support import free_port

    from resources.event_stream.redis_backend import RedisEventStream

    sensor = trigger().sensor(
        open_events=lambda: RedisEventStream(f"redis://127.0.0.1:{free_port()}/0", event_stream.registry)
    )
    event_stream.registry.upsert(StreamSpec(name="orders"))
    with pytest.raises(Exception, match="unreachable"):
        evaluate(sensor, instance, cursor=TriggerCursor(after="5-0").serialize())
