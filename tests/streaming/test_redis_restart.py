"""A real `redis-server` killed (SIGKILL) and restarted mid-stream: no acknowledged event is lost.

The server runs on its own port and directory with `appendonly yes` / `appendfsync always` (what the
production notes recommend; Redis 7.0 has no WAITAOF): Redis fsyncs the AOF before it replies, so a
publish that returned is on disk. While publishers keep going, the server is killed and restarted
on the same port and directory. Afterwards:
- every publish that returned (single or batch, with or without idempotency key) is readable, with
  its payload;
- every publish that raised raised `EventStreamUnavailable` naming the server (never a silent drop);
  the keyed ones, published again with the same keys, are stored exactly once;
- while the server was down the gateway answered 503 and a stream trigger's tick failed naming the
  unreachable server; after the restart the tick resumes from its cursor and requests exactly one
  run per event after it.
"""

# No `from __future__ import annotations`: Dagster reads the op's config annotation at definition time.

import os
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import dagster as dg
import pytest
import redis
from fastapi.testclient import TestClient
from support import bearer, free_port, wait_until

from orchestration.gateway.app import create_gateway_app
from orchestration.kernel.principals import create_api_key
from orchestration.settings import JunctionSettings
from resources.event_stream import EventStreamUnavailable, EventToPublish, StreamRegistry, StreamSpec
from resources.event_stream.redis_backend import RedisEventStream
from sensors.event_triggers import EventRangeConfig, JobTarget, StreamTrigger, TriggerCursor

pytestmark = [pytest.mark.redis, pytest.mark.slow]

SCHEMA = {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}}


class RedisServer:
    """A `redis-server` of this test's own: port, directory, AOF with fsync before every reply."""

    def __init__(self, directory: Path):
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        self.binary, self.directory, self.port = binary, directory, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.directory),
                "--appendonly", "yes",
                "--appendfsync", "always",
                "--save", "",
                "--logfile", str(self.directory / "redis.log"),
            ],
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 20
        while True:
            try:
                if client.ping():  # answers once the AOF is loaded
                    break
            except (redis.ConnectionError, redis.BusyLoadingError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"redis-server did not start: {self.log()}") from None
                time.sleep(0.05)
        client.close()

    def kill(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def log(self) -> str:
        path = self.directory / "redis.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else "(no log)"


@pytest.fixture
def redis_server(tmp_path: Path):
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


class Publisher(threading.Thread):
    """Publishes without pause, alternating single events and batches, keyed and not.

    Records what returned (`acknowledged`: payload and id) and what raised (`failed`: the events of
    the call and the error); never retries itself.
    """

    def __init__(self, url: str, registry: StreamRegistry, name: str):
        super().__init__(name=name, daemon=True)
        self.events = RedisEventStream(url, registry)
        self.prefix = name
        self.acknowledged: list[tuple[dict, str]] = []
        self.failed: list[tuple[list[EventToPublish], Exception]] = []
        self.stop = threading.Event()
        self.calls = 0

    def next_call(self) -> list[EventToPublish]:
        self.calls += 1
        size = 1 if self.calls % 3 else 25
        items = []
        for offset in range(size):
            n = self.calls * 100 + offset  # unique within this publisher
            keyed = (self.calls + offset) % 2 == 0
            key = f"{self.prefix}-{self.calls}-{offset}" if keyed else None
            items.append(EventToPublish({"n": n, "by": self.prefix, "key": key}, key))
        return items

    def run(self) -> None:
        while not self.stop.is_set():
            items = self.next_call()
            try:
                if len(items) == 1:
                    result = self.events.publish(
                        "orders", items[0].payload, idempotency_key=items[0].idempotency_key
                    )
                    results = [result]
                else:
                    results = self.events.publish_batch("orders", items).results
            except Exception as exc:  # noqa: BLE001 - recorded and checked by the test
                self.failed.append((items, exc))
                time.sleep(0.02)
                continue
            for item, result in zip(items, results, strict=True):
                assert result.status == "accepted", result
                self.acknowledged.append((item.payload, result.id))
            time.sleep(0.001)

    def finish(self) -> None:
        self.stop.set()
        self.join(timeout=60)
        assert not self.is_alive(), "the publisher did not stop"
        self.events.close()


@dg.op
def handle_orders(config: EventRangeConfig) -> None: ...


@dg.job
def orders_job() -> None:
    handle_orders()


def tick(sensor: dg.SensorDefinition, instance, cursor: str | None):
    context = dg.build_sensor_context(instance=instance, cursor=cursor, sensor_name=sensor.name)
    return sensor.evaluate_tick(context)


def tick_until_caught_up(sensor, instance, cursor: str | None) -> tuple[list[str], str | None]:
    keys: list[str] = []
    while True:
        result = tick(sensor, instance, cursor)
        keys += [request.run_key for request in result.run_requests]
        if result.cursor == cursor or not result.run_requests:
            return keys, result.cursor
        cursor = result.cursor


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_a_killed_and_restarted_redis_loses_no_acknowledged_event(redis_server, store_url):
    registry = StreamRegistry.for_url(store_url)
    registry.upsert(StreamSpec(name="orders", payload_schema=SCHEMA, idempotency_window="1h"))
    _, secret = create_api_key("restart-test", scopes=["events:publish:orders"], created_by="test")
    gateway = TestClient(
        create_gateway_app(
            JunctionSettings(dagster_url=f"http://127.0.0.1:{free_port()}", redis_url=redis_server.url)
        ),
        raise_server_exceptions=False,
    )
    gateway.__enter__()
    reader = RedisEventStream(redis_server.url, registry)
    trigger = StreamTrigger(
        name="orders_on_restart",
        stream="orders",
        target=JobTarget(orders_job, config_op="handle_orders"),
        max_runs_per_tick=400,
    )
    sensor = trigger.sensor(open_events=lambda: RedisEventStream(redis_server.url, registry))
    publishers = [Publisher(redis_server.url, registry, f"p{i}") for i in range(2)]
    try:
        with dg.instance_for_test() as instance:
            assert (
                gateway.post(
                    "/v1/streams/orders/events", json={"payload": {"n": -1}}, headers=bearer(secret)
                ).status_code
                == 201
            )
            for publisher in publishers:
                publisher.start()
            acknowledged = lambda: sum(len(p.acknowledged) for p in publishers)  # noqa: E731
            wait_until(lambda: acknowledged() >= 300, 60, "300 acknowledged events")
            before_kill = tick(sensor, instance, None)
            assert before_kill.run_requests, "the sensor saw the events published so far"

            redis_server.kill()  # mid-stream: both publishers are sending
            wait_until(lambda: all(p.failed for p in publishers), 60, "every publisher to fail")
            with pytest.raises(EventStreamUnavailable, match=rf"127.0.0.1:{redis_server.port}.*unreachable"):
                reader.publish("orders", {"n": -2})
            down = gateway.post(
                "/v1/streams/orders/events", json={"payload": {"n": -3}}, headers=bearer(secret)
            )
            assert down.status_code == 503, down.text
            assert down.json()["type"] == "urn:junction:problem:stream-unavailable"
            with pytest.raises(Exception, match="unreachable") as failed_tick:
                tick(sensor, instance, before_kill.cursor)
            assert f"127.0.0.1:{redis_server.port}" in str(failed_tick.value)

            acknowledged_while_down = acknowledged()
            redis_server.start()  # the same port and directory: the AOF is replayed
            wait_until(
                lambda: acknowledged() >= acknowledged_while_down + 300, 60, "300 more acknowledged events"
            )
            for publisher in publishers:
                publisher.finish()
            assert (
                gateway.post(
                    "/v1/streams/orders/events", json={"payload": {"n": -4}}, headers=bearer(secret)
                ).status_code
                == 201
            )

            # Whatever raised, raised the clear error; the keyed ones go again and are stored once.
            failed = [(items, exc) for p in publishers for items, exc in p.failed]
            assert failed
            for _, exc in failed:
                assert isinstance(exc, EventStreamUnavailable), repr(exc)
                assert "is unreachable" in str(exc)
            retried = [item for items, _ in failed for item in items if item.idempotency_key]
            retry_results = reader.publish_batch("orders", retried).results
            assert {result.status for result in retry_results} <= {"accepted", "duplicate"}

            stored = {event.id: event.payload for event in reader.iter_events("orders")}
            lost = [
                (payload, event_id)
                for p in publishers
                for payload, event_id in p.acknowledged
                if stored.get(event_id) != payload
            ]
            assert not lost, f"{len(lost)} acknowledged events missing after the restart: {lost[:5]}"
            per_key = Counter(payload["key"] for payload in stored.values() if payload.get("key"))
            assert per_key, "keyed events were published"
            assert max(per_key.values()) == 1, [key for key, count in per_key.items() if count > 1]
            keys_expected = {item.idempotency_key for items, _ in failed for item in items} - {None}
            assert keys_expected <= set(per_key), "every retried keyed event is stored"

            # The sensor resumes from the cursor it saved before the outage: one run per later event.
            resumed, _ = tick_until_caught_up(sensor, instance, before_kill.cursor)
            after = TriggerCursor.parse(before_kill.cursor).after
            later_ids = sorted((i for i in stored if _id(i) > _id(after)), key=_id)
            assert resumed == [f"evt:orders:{event_id}" for event_id in later_ids]
            first_keys = [request.run_key for request in before_kill.run_requests]
            assert not set(first_keys) & set(resumed)
    finally:
        for publisher in publishers:
            if publisher.is_alive():
                publisher.stop.set()
        reader.close()
        gateway.__exit__(None, None, None)


def _id(text: str) -> tuple[int, int]:
    ms, _, seq = text.partition("-")
    return int(ms), int(seq)
