"""Durable webhook subscriptions against a real gateway under uvicorn and a real receiver: signed,
filtered deliveries; retries honouring Retry-After; the dead letter with the last answer and its replay
from the CLI; order per key; a breaker per destination; owners (YAML and API); on Redis and SQL."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from support import ServedApp, bearer, free_port, wait_until

from orchestration.kernel.principals import create_api_key

pytestmark = pytest.mark.slow
PROJECT_ROOT = Path(__file__).resolve().parents[2]
STREAM = "hooks.orders"
SECRET_ENV = "JUNCTION_TEST_HOOK_SECRET"
SECRET = "s3cret-for-tests"


class Receiver:
    """A webhook receiver: records every request; `answers` (a list of statuses, or a function of the
    request's body) says what to answer; `delay_s` makes it slow."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.answers: list[int] = []
        self.retry_after: str | None = None
        self.delay_s = 0.0
        app = Starlette(routes=[Route("/hook/{name}", self.hook, methods=["POST"])])
        self.server = ServedApp(app)

    async def hook(self, request: Request) -> Response:
        import anyio

        body = await request.body()
        with self.lock:
            self.requests.append({"path": request.url.path, "headers": dict(request.headers), "body": body})
            status = self.answers.pop(0) if self.answers else 200
        if self.delay_s:
            await anyio.sleep(self.delay_s * random.uniform(0.5, 1.5))
        headers = {"Retry-After": self.retry_after} if self.retry_after and status != 200 else {}
        return JSONResponse({"status": status}, status_code=status, headers=headers)

    def url(self, name: str = "a") -> str:
        return self.server.url(f"/hook/{name}")

    def events(self, name: str | None = None) -> list[dict]:
        with self.lock:
            return [
                event
                for request in self.requests
                if name is None or request["path"].endswith("/" + name)
                for event in json.loads(request["body"])["events"]
            ]


@pytest.fixture(params=["redis", "sqlite"])
def backend(request) -> str:
    return request.param


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    started = Receiver()
    yield started
    started.server.stop()


@pytest.fixture
def hooks(request, backend: str, junction_home, monkeypatch) -> Iterator[Callable[..., ServedApp]]:
    """Start a gateway on this test's store (Redis or SQL events) with a fast dispatcher."""
    from orchestration.server import standalone_gateway
    from orchestration.settings import JunctionSettings, reset_settings_cache
    from orchestration.store import get_engine, upgrade
    from resources.event_stream import StreamRegistry, StreamSpec

    store_url = f"sqlite:///{junction_home / 'platform.db'}"
    monkeypatch.setenv("JUNCTION_DATABASE_URL", store_url)
    monkeypatch.setenv(SECRET_ENV, SECRET)
    if backend == "redis":
        monkeypatch.setenv("JUNCTION_REDIS_URL", request.getfixturevalue("clean_redis_url"))
    reset_settings_cache()
    upgrade(store_url)
    StreamRegistry(get_engine(store_url)).upsert(StreamSpec(name=STREAM, retention={"max_count": 100_000}))
    servers: list[ServedApp] = []

    def start(**overrides) -> ServedApp:
        settings = JunctionSettings(
            dagster_url=f"http://127.0.0.1:{free_port()}",
            dispatcher_refresh_s=0.2,
            dispatcher_claim_idle_s=1.5,
            **overrides,
        )
        server = ServedApp(standalone_gateway(settings))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def admin() -> str:
    return create_api_key("hooks-admin", scopes=["admin"], created_by="test")[1]


def put_subscription(server: ServedApp, token: str, name: str, expected: int = 201, **spec) -> dict:
    response = httpx.put(
        server.url(f"/gateway/v1/subscriptions/{name}"),
        json={"stream": STREAM, **spec},
        headers=bearer(token),
        timeout=30,
    )
    assert response.status_code == expected, response.text
    return response.json()


def publish(server: ServedApp, token: str, payloads: list) -> list[str]:
    response = httpx.post(
        server.url(f"/gateway/v1/streams/{STREAM}/events"),
        json=[{"payload": payload} for payload in payloads],
        headers=bearer(token),
        timeout=30,
    )
    assert response.status_code == 201, response.text
    return [item["id"] for item in response.json()["results"]]


def stats(server: ServedApp, token: str, name: str) -> dict:
    response = httpx.get(
        server.url(f"/gateway/v1/subscriptions/{name}/stats"), headers=bearer(token), timeout=30
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_deliveries_are_signed_filtered_acknowledged_and_counted(hooks, receiver):
    from resources.notifications import verify_signature

    server, token = hooks(), admin()
    declared = put_subscription(
        server,
        token,
        "big-orders",
        url=receiver.url(),
        filter={"field": "total", "op": "gte", "value": 100},
        secret_env=SECRET_ENV,
    )
    assert declared["origin"] == "api" and declared["group"] == "subscription:big-orders"
    put_subscription(
        server,
        token,
        "big-orders",
        expected=200,
        url=receiver.url(),
        secret_env=SECRET_ENV,
        filter={"field": "total", "op": "gte", "value": 100},
    )
    ids = publish(server, token, [{"n": n, "total": 50 * n} for n in range(6)])
    wait_until(lambda: len(receiver.events()) == 4, 20, "the four matching events to be delivered")
    assert [event["id"] for event in receiver.events()] == ids[2:]
    for request in receiver.requests:
        verify_signature(SECRET, request["headers"], request["body"])  # raises when not authentic
        event = json.loads(request["body"])["events"][0]
        assert (
            request["headers"]["x-junction-delivery"] == event["delivery_id"] == f"big-orders:{event['id']}"
        )
    wait_until(
        lambda: stats(server, token, "big-orders")["group"]["pending"] == 0, 10, "the acknowledgements"
    )
    figures = stats(server, token, "big-orders")
    assert figures["dispatcher"]["delivered"] == 4 and figures["dispatcher"]["filtered"] == 2
    assert figures["dispatcher"]["attempts"] == 4 and figures["dispatcher"]["latency_p99_ms"] > 0
    # /gateway/metrics needs Dagster (run counts): its subscription families, from this gateway's state.
    from orchestration.gateway.api.analytics import subscription_metric_families

    families = {
        f.name: f for f in subscription_metric_families(server.server.config.app.gateway.state.dispatcher)
    }
    [sample] = families["junction_subscription_deliveries"].samples
    assert sample.labels == {"subscription": "big-orders"} and sample.value == 4


def test_failures_are_retried_after_retry_after_then_dead_lettered_and_replayed(hooks, receiver, tmp_path):
    server, token = hooks(), admin()
    receiver.answers = [503, 503]
    receiver.retry_after = "0"
    put_subscription(server, token, "flaky", url=receiver.url("flaky"), initial_backoff="30s")
    publish(server, token, [{"n": 1}])
    # Retry-After 0 replaces the 30 s backoff: the third attempt succeeds at once.
    wait_until(lambda: len(receiver.events("flaky")) == 3, 20, "two failed attempts and a third")
    assert [json.loads(r["body"])["attempt"] for r in receiver.requests] == [1, 2, 3]
    assert len({r["headers"]["x-junction-delivery"] for r in receiver.requests}) == 1  # a stable id

    # Another receiver (another destination): the flaky one's failures count in its own breaker.
    assert (
        httpx.delete(server.url("/gateway/v1/subscriptions/flaky"), headers=bearer(token)).status_code == 204
    )
    receiver.server.stop()
    receiver = Receiver()
    receiver.answers = [500] * 4
    put_subscription(
        server, token, "doomed", url=receiver.url("doomed"), max_deliveries=2, initial_backoff="50ms"
    )
    doomed = publish(server, token, [{"n": 2}, {"n": 3}])
    wait_until(
        lambda: (stats(server, token, "doomed")["dispatcher"] or {}).get("dead_lettered") == 2,
        20,
        "two dead letters",
    )
    figures = stats(server, token, "doomed")
    assert figures["group"]["pending"] == 0 and figures["dead_letters"] >= 2
    assert figures["dispatcher"]["attempts"] == 4 and figures["dispatcher"]["last_status"] == 500

    dead = httpx.get(
        server.url("/gateway/v1/subscriptions/doomed/dead-letters"), headers=bearer(token), timeout=30
    ).json()["dead_letters"]
    records = [entry["record"] for entry in dead]
    assert sorted(record["event_id"] for record in records) == doomed  # unordered: delivered in parallel
    assert records[0]["last_status"] == 500 and records[0]["deliveries"] == 2
    assert json.loads(records[0]["last_answer"]) == {"status": 500}

    receiver.requests.clear()
    env = {**os.environ, "JUNCTION_DATABASE_URL": os.environ["JUNCTION_DATABASE_URL"]}
    replay = subprocess.run(
        [sys.executable, "-m", "orchestration.cli", "events", "subscriptions", "replay", "doomed"],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert replay.returncode == 0, replay.stderr
    assert "2 replayed" in replay.stdout + replay.stderr
    assert sorted(event["id"] for event in receiver.events("doomed")) == doomed
    again = subprocess.run(
        [sys.executable, "-m", "orchestration.cli", "events", "subscriptions", "replay", "doomed"],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0 and "0 replayed" in again.stdout + again.stderr  # each once
    receiver.server.stop()


def test_events_of_one_key_arrive_in_order_while_keys_go_in_parallel(hooks, receiver):
    server, token = hooks(), admin()
    receiver.delay_s = 0.01
    receiver.answers = [503 if n % 7 == 0 else 200 for n in range(60)]  # retries must not reorder
    receiver.retry_after = "0"
    put_subscription(
        server,
        token,
        "ordered",
        url=receiver.url("ordered"),
        ordering={"per_key": "customer"},
        batch_size=2,
        concurrency=4,
    )
    payloads = [{"customer": f"c{n % 4}", "n": n} for n in range(40)]
    publish(server, token, payloads)
    wait_until(lambda: len({e["id"] for e in receiver.events("ordered")}) == 40, 30, "every event")
    for customer in ("c0", "c1", "c2", "c3"):
        seen = [e["payload"]["n"] for e in receiver.events("ordered") if e["payload"]["customer"] == customer]
        deduped = list(dict.fromkeys(seen))
        assert deduped == sorted(deduped), (customer, seen)
    assert stats(server, token, "ordered")["dispatcher"]["holds_lease"] is True


def test_a_destination_that_is_down_opens_its_breaker_instead_of_burning_attempts(hooks):
    server, token = hooks(), admin()
    closed = f"http://127.0.0.1:{free_port()}/hook"
    put_subscription(
        server, token, "down", url=closed, initial_backoff="10ms", max_deliveries=100, concurrency=8
    )
    publish(server, token, [{"n": n} for n in range(8)])

    def opened() -> bool:
        figures = stats(server, token, "down")
        return (figures["breaker"] or {}).get("state") == "open" and figures["dispatcher"][
            "breaker_waits"
        ] > 0

    wait_until(opened, 20, "the destination's breaker to open")
    figures = stats(server, token, "down")
    assert figures["dispatcher"]["dead_lettered"] == 0 and figures["group"]["pending"] == 8
    assert figures["dispatcher"]["attempts"] < 40  # refused by the breaker, not tried a hundred times each


def test_owners_and_bad_declarations(hooks, receiver, tmp_path, backend):
    from orchestration.kernel.spec_errors import SpecError
    from orchestration.store import get_engine
    from resources.event_stream import open_event_stream
    from resources.event_stream.subscriptions import SubscriptionRegistry, sync_declared

    folder = tmp_path / "subscriptions"
    folder.mkdir()
    (folder / "partner.yaml").write_text(f"name: partner\nstream: {STREAM}\nurl: {receiver.url('p')}\n")
    registry = SubscriptionRegistry(get_engine())
    with open_event_stream() as events:
        [declared] = sync_declared(events, registry, folder)
        assert declared.origin == "yaml:partner.yaml"
        server, token = hooks(subscriptions_dir=folder), admin()
        response = httpx.put(
            server.url("/gateway/v1/subscriptions/partner"),
            json={"stream": STREAM, "url": receiver.url()},
            headers=bearer(token),
        )
        assert response.status_code == 409 and "partner.yaml" in response.json()["detail"]
        assert (
            httpx.delete(server.url("/gateway/v1/subscriptions/partner"), headers=bearer(token)).status_code
            == 409
        )

        put_subscription(server, token, "api-owned", url=receiver.url())
        (folder / "clash.yaml").write_text(f"name: api-owned\nstream: {STREAM}\nurl: {receiver.url()}\n")
        (folder / "bad.yaml").write_text(f"name: bad\nstream: {STREAM}\nurl: ftp://x\nbatch_size: 0\n")
        with pytest.raises(SpecError) as raised:
            sync_declared(events, registry, folder)
        text = str(raised.value)
        assert "bad.yaml" in text and "url" in text and "batch_size" in text
    for body, field in [
        ({"stream": "no.such.stream", "url": receiver.url()}, "body.stream"),
        ({"stream": STREAM, "url": "not a url"}, "body.url"),
        ({"stream": STREAM, "url": receiver.url(), "filter": {"field": "x", "op": "nope"}}, "body.filter"),
    ]:
        response = httpx.put(server.url("/gateway/v1/subscriptions/x"), json=body, headers=bearer(token))
        assert response.status_code == 422, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        assert field in response.text
    reader = create_api_key("reader", scopes=["subscriptions:manage"], created_by="test")[1]
    response = httpx.put(
        server.url("/gateway/v1/subscriptions/sneaky"),
        json={"stream": STREAM, "url": receiver.url()},
        headers=bearer(reader),
    )
    assert response.status_code == 403 and f"events:read:{STREAM}" in response.json()["detail"]
    assert (
        httpx.delete(server.url("/gateway/v1/subscriptions/api-owned"), headers=bearer(token)).status_code
        == 204
    )
    listed = httpx.get(server.url("/gateway/v1/subscriptions"), headers=bearer(token)).json()["subscriptions"]
    assert [s["name"] for s in listed] == ["partner"]


def test_two_gateways_split_the_deliveries_and_a_killed_ones_are_claimed_not_lost(
    tmp_path: Path, clean_postgres_url: str, clean_redis_url: str, monkeypatch
):
    """Two `junction gateway` processes on one Redis and one PostgreSQL store share a subscription's
    deliveries; SIGKILL one mid-batch: every event still arrives, and the only duplicates are the
    killed one's unacknowledged events, which the survivor claims (counted as redelivered)."""
    import signal

    from support import start_gateway, wait_healthy

    from orchestration.settings import reset_settings_cache
    from orchestration.store import get_engine, upgrade
    from resources.event_stream import StreamRegistry, StreamSpec

    monkeypatch.setenv("JUNCTION_DATABASE_URL", clean_postgres_url)
    monkeypatch.setenv("JUNCTION_HOME", str(tmp_path / "home"))
    reset_settings_cache()
    upgrade(clean_postgres_url)
    StreamRegistry(get_engine(clean_postgres_url)).upsert(StreamSpec(name=STREAM))
    token = admin()
    env = {
        **os.environ,
        "JUNCTION_DATABASE_URL": clean_postgres_url,
        "JUNCTION_REDIS_URL": clean_redis_url,
        "JUNCTION_HOME": str(tmp_path / "home"),
        "JUNCTION_DAGSTER_URL": f"http://127.0.0.1:{free_port()}",
        "JUNCTION_DISPATCHER_REFRESH_S": "0.2",
        "JUNCTION_DISPATCHER_CLAIM_IDLE_S": "2",
    }
    receiver = Receiver()
    receiver.delay_s = 0.1
    gateways = [start_gateway(tmp_path, env, name) for name in ("a", "b")]
    try:
        for (process, base), name in zip(gateways, ("a", "b"), strict=True):
            wait_healthy(base, process, tmp_path / f"{name}.log")
        (killed, killed_base), (survivor, survivor_base) = gateways
        response = httpx.put(
            f"{killed_base}/v1/subscriptions/split",
            json={"stream": STREAM, "url": receiver.url("split"), "batch_size": 2, "concurrency": 2},
            headers=bearer(token),
        )
        assert response.status_code == 201, response.text

        def delivered(base: str) -> int:
            answer = httpx.get(
                f"{base}/v1/subscriptions/split/stats", headers=bearer(token), timeout=10
            ).json()
            return (answer["dispatcher"] or {}).get("delivered", 0)

        published: list[str] = []
        for start in range(0, 400, 20):
            answer = httpx.post(
                f"{killed_base}/v1/streams/{STREAM}/events",
                json=[{"payload": {"n": n}} for n in range(start, start + 20)],
                headers=bearer(token),
            )
            published += [item["id"] for item in answer.json()["results"]]
            time.sleep(0.05)
        wait_until(
            lambda: delivered(killed_base) >= 10 and delivered(survivor_base) >= 10,
            30,
            "both gateways to deliver",
        )
        killed.send_signal(signal.SIGKILL)  # mid-batch: the receiver is slow, deliveries are in flight
        killed.wait(10)
        wait_until(
            lambda: {e["id"] for e in receiver.events("split")} == set(published),
            90,
            "every event to arrive",
            detail=lambda: f"{len({e['id'] for e in receiver.events('split')})} of {len(published)}",
        )
        figures = httpx.get(f"{survivor_base}/v1/subscriptions/split/stats", headers=bearer(token)).json()
        received = [e["id"] for e in receiver.events("split")]
        duplicates = len(received) - len(set(received))
        assert figures["dispatcher"]["redelivered"] >= 1  # it claimed the killed one's pending events
        assert duplicates <= figures["dispatcher"]["redelivered"]
        wait_until(
            lambda: (
                httpx.get(f"{survivor_base}/v1/subscriptions/split/stats", headers=bearer(token)).json()[
                    "group"
                ]["pending"]
                == 0
            ),
            20,
            "nothing left pending",
        )
        survivor.send_signal(signal.SIGTERM)  # a clean stop: nothing in flight, exit 0
        assert survivor.wait(30) == 0
    finally:
        for process, _ in gateways:
            if process.poll() is None:
                process.kill()
        receiver.server.stop()
