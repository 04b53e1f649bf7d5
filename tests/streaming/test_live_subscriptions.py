"""WebSocket subscriptions against a real gateway under uvicorn, with the `websockets` library as the
client: live events with filters, gap-free resume and handover from catch-up to live, retention gaps
reported, a consumer that stops reading closed (memory bounded), auth by header, first message and
stream token, scopes, publishing with acknowledgements, heartbeats, idle timeout, connection limit."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from support import ServedApp, bearer, free_port
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from orchestration.kernel.principals import create_api_key

pytestmark = pytest.mark.slow
STREAM = "live.orders"
SCHEMA = {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}}


@pytest.fixture(params=["redis", "sqlite"])
def backend(request) -> str:
    return request.param


@pytest.fixture
def live(request, backend: str, junction_home, monkeypatch) -> Iterator[Callable[..., ServedApp]]:
    """Start a gateway (settings overrides as keywords) on this test's store, Redis or SQL events."""
    from orchestration.server import standalone_gateway
    from orchestration.settings import JunctionSettings, reset_settings_cache
    from orchestration.store import get_engine, upgrade
    from resources.event_stream import StreamRegistry, StreamSpec

    store_url = f"sqlite:///{junction_home / 'platform.db'}"
    monkeypatch.setenv("JUNCTION_DATABASE_URL", store_url)
    if backend == "redis":
        monkeypatch.setenv("JUNCTION_REDIS_URL", request.getfixturevalue("clean_redis_url"))
    reset_settings_cache()
    upgrade(store_url)
    registry = StreamRegistry(get_engine(store_url))
    registry.upsert(StreamSpec(name=STREAM, payload_schema=SCHEMA, retention={"max_count": 100_000}))
    registry.upsert(StreamSpec(name="live.small", retention={"max_count": 5}))
    servers: list[ServedApp] = []

    def start(port: int | None = None, **overrides) -> ServedApp:
        settings = JunctionSettings(dagster_url=f"http://127.0.0.1:{free_port()}", **overrides)
        server = ServedApp(standalone_gateway(settings), port=port)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def key(*scopes: str, name: str = "live-client") -> str:
    return create_api_key(name, scopes=scopes, created_by="test")[1]


def ws_url(server: ServedApp, query: str = "") -> str:
    return server.url("/gateway/v1/streams/ws" + query, scheme="ws")


def publish(server: ServedApp, token: str, payloads: list, stream: str = STREAM) -> list[str]:
    response = httpx.post(
        server.url(f"/gateway/v1/streams/{stream}/events"),
        json=[{"payload": payload} for payload in payloads],
        headers=bearer(token),
        timeout=30,
    )
    assert response.status_code == 201, response.text
    return [item["id"] for item in response.json()["results"]]


def receive(socket, kind: str | None = None, timeout: float = 10) -> dict:
    """The next message (of type `kind`, skipping pings)."""
    deadline = time.monotonic() + timeout
    while True:
        message = json.loads(socket.recv(timeout=max(deadline - time.monotonic(), 0.01)))
        if message["type"] == "ping":
            continue
        if kind is None or message["type"] == kind:
            return message
        raise AssertionError(f"expected {kind}, got {message}")


def collect(socket, count: int, timeout: float = 15) -> list[dict]:
    """`count` events (across frames), in the order received."""
    events: list[dict] = []
    deadline = time.monotonic() + timeout
    while len(events) < count:
        message = receive(socket, timeout=deadline - time.monotonic())
        assert message["type"] == "events", message
        events.extend(message["events"])
    return events


def subscribe(socket, sub: str = "s1", stream: str = STREAM, **fields) -> dict:
    socket.send(json.dumps({"type": "subscribe", "id": sub, "stream": stream, **fields}))
    return receive(socket, "subscribed")


def open_socket(server: ServedApp, token: str, **options):
    socket = connect(ws_url(server), additional_headers=bearer(token), open_timeout=10, **options)
    assert receive(socket, "welcome")["principal"]
    return socket


def test_live_events_with_a_filter_and_publishing_over_the_socket(live):
    server = live()
    token = key(f"events:read:{STREAM}", f"events:publish:{STREAM}")
    with open_socket(server, token) as socket:
        subscribed = subscribe(socket, "big", filter={"field": "n", "op": "gte", "value": 5})
        assert subscribed["stream"] == STREAM
        ids = publish(server, token, [{"n": n} for n in range(10)])
        events = collect(socket, 5)
        assert [event["payload"]["n"] for event in events] == [5, 6, 7, 8, 9]
        assert [event["id"] for event in events] == ids[5:]

        socket.send(json.dumps({"type": "publish", "ref": "p1", "stream": STREAM, "payload": {"n": 42}}))
        # The event may reach the subscription before the acknowledgement: both arrive, in either order.
        messages = {message["type"]: message for message in (receive(socket), receive(socket))}
        acknowledged = messages["published"]
        assert acknowledged["ref"] == "p1" and acknowledged["status"] == "accepted"
        assert messages["events"]["events"] == [{**collect_shape(acknowledged["id"]), "payload": {"n": 42}}]

        socket.send(json.dumps({"type": "publish", "ref": "p2", "stream": STREAM, "payload": {"n": "x"}}))
        error = receive(socket, "error")
        assert error["ref"] == "p2" and error["code"] == "validation" and error["field"] == "payload"

        stats = httpx.get(server.url(f"/gateway/v1/streams/{STREAM}/stats"), headers=bearer(token)).json()
        assert stats["live"]["subscriptions"] == 1
        assert stats["live"]["events_read"] == 11 and stats["live"]["events_delivered"] == 6


def collect_shape(event_id: str) -> dict:
    from datetime import UTC, datetime

    from resources.event_stream import EventId

    moment = datetime.fromtimestamp(EventId.parse(event_id).ms / 1000, UTC)
    return {"id": event_id, "time": moment.isoformat()}


def test_resume_from_the_last_id_received_gets_exactly_the_missed_events(live):
    server = live()
    token = key(f"events:read:{STREAM}", f"events:publish:{STREAM}")
    ids = publish(server, token, [{"n": n} for n in range(10)])
    with open_socket(server, token) as socket:
        subscribe(socket, **{"from": "earliest"})
        first = collect(socket, 10)
    assert [event["id"] for event in first] == ids
    last_seen = first[3]["id"]  # as if the client had dropped after the fourth
    more = publish(server, token, [{"n": n} for n in range(10, 15)])
    with open_socket(server, token) as socket:
        assert subscribe(socket, **{"from": last_seen})["position"] == last_seen
        resumed = collect(socket, 11)
        assert [event["id"] for event in resumed] == ids[4:] + more
        with pytest.raises(TimeoutError):
            socket.recv(timeout=0.5)  # nothing more: no duplicates


def test_catching_up_while_events_keep_coming_has_no_gap_and_no_duplicate(live):
    server = live()
    token = key(f"events:read:{STREAM}", f"events:publish:{STREAM}")
    published: list[str] = publish(server, token, [{"n": n} for n in range(700)])
    published += publish(server, token, [{"n": n} for n in range(700, 1300)])
    stop = threading.Event()

    def keep_publishing() -> None:
        n = 0
        while not stop.is_set() and n < 3000:
            published.extend(publish(server, token, [{"n": n + i} for i in range(20)]))
            n += 20

    publisher = threading.Thread(target=keep_publishing)
    publisher.start()
    try:
        with open_socket(server, token) as socket:
            subscribe(socket, **{"from": "earliest"})
            time.sleep(0.3)
            stop.set()
            publisher.join()
            received = collect(socket, len(published), timeout=60)
    finally:
        stop.set()
        publisher.join()
    assert [event["id"] for event in received] == published


def test_events_removed_by_retention_are_reported_not_skipped(live, backend):
    server = live()
    token = key("events:read:live.small", "events:publish:live.small")
    old = publish(server, token, [{"n": n} for n in range(3)], stream="live.small")
    publish(server, token, [{"n": n} for n in range(3, 40)], stream="live.small")
    from resources.event_stream import open_event_stream

    with open_event_stream() as events:
        events.trim("live.small")
        retained = [event.id for event in events.read("live.small", None, limit=100)]
    with open_socket(server, token) as socket:
        subscribe(socket, stream="live.small", **{"from": old[0]})
        lost = receive(socket, "events_lost")
        assert lost["sub"] == "s1" and lost["from"] > old[0] and lost["to"] < retained[0]
        assert [event["id"] for event in collect(socket, len(retained))] == retained


def test_a_consumer_that_stops_reading_is_closed_and_memory_stays_bounded(live):
    server = live(live_send_queue_bytes=64 * 1024)
    token = key(f"events:read:{STREAM}", f"events:publish:{STREAM}")
    # A small receive buffer and no reading: the server's socket stops draining, its queue fills.
    socket = open_socket(server, token, max_queue=1, max_size=2**20)
    subscribe(socket)
    blob = "x" * 8000
    for _ in range(40):
        publish(server, token, [{"n": n, "blob": blob} for n in range(50)])
    stats = server.server.config.app.gateway.state.live_stats
    from support import wait_until

    wait_until(lambda: stats.slow_consumers == 1, 30, "the slow consumer to be cut off")
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            socket.recv(timeout=10)
    assert closed.value.rcvd.code == 4008
    assert "resume" in closed.value.rcvd.reason
    wait_until(lambda: stats.connections == 0, 10, "the connection to be released")


@pytest.mark.parametrize("backend", ["sqlite"])  # authentication does not depend on the backend
def test_authentication_by_first_message_and_stream_token_and_scopes(live, backend):
    server = live()
    reader = key(f"events:read:{STREAM}", name="reader")
    with connect(ws_url(server), open_timeout=10) as socket:  # no header: the first message
        socket.send(json.dumps({"type": "auth", "token": reader}))
        assert receive(socket, "welcome")["principal"] == "reader"
        assert subscribe(socket)["id"] == "s1"
        socket.send(json.dumps({"type": "subscribe", "id": "s2", "stream": "live.small"}))
        error = receive(socket, "error")
        assert (error["code"], error["ref"]) == ("forbidden", "s2")
        socket.send(json.dumps({"type": "subscribe", "id": "s3", "stream": STREAM, "from": "yesterday"}))
        assert receive(socket, "error")["field"] == "from"
        socket.send(json.dumps({"type": "subscribe", "id": "s4", "stream": STREAM, "filter": {"op": "gt"}}))
        assert receive(socket, "error")["field"].startswith("filter")
        socket.send(json.dumps({"type": "publish", "ref": "p", "stream": STREAM, "payload": {"n": 1}}))
        assert receive(socket, "error")["code"] == "forbidden"
        socket.send("not json")
        assert receive(socket, "error")["code"] == "invalid-message"

    for bad in ("jk_nope", None):
        with connect(ws_url(server), open_timeout=10) as socket:
            socket.send(json.dumps({"type": "auth", "token": bad} if bad else {"type": "pong"}))
            with pytest.raises(ConnectionClosed) as closed:
                socket.recv(timeout=10)
            assert closed.value.rcvd.code == 4001

    minted = httpx.post(
        server.url("/gateway/v1/streams/tokens"),
        json={"scopes": [f"events:read:{STREAM}"]},
        headers=bearer(reader),
    )
    assert minted.status_code == 201, minted.text
    with connect(ws_url(server, f"?token={minted.json()['token']}"), open_timeout=10) as socket:
        assert receive(socket, "welcome")["principal"] == "reader"
    wider = httpx.post(
        server.url("/gateway/v1/streams/tokens"), json={"scopes": ["events:read"]}, headers=bearer(reader)
    )
    assert wider.status_code == 403 and wider.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize("backend", ["sqlite"])  # connection handling does not depend on it either
def test_heartbeats_idle_timeout_and_the_connection_limit(live, backend):
    server = live(live_heartbeat_s=0.2, live_idle_timeout_s=1.0, live_max_connections_per_key=2)
    token = key(f"events:read:{STREAM}")
    with open_socket(server, token) as socket:
        assert json.loads(socket.recv(timeout=5))["type"] == "ping"
        for _ in range(8):  # answering pings keeps it open past the idle timeout
            if json.loads(socket.recv(timeout=5))["type"] == "ping":
                socket.send(json.dumps({"type": "pong"}))
    with open_socket(server, token) as silent:
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                silent.recv(timeout=5)
        assert closed.value.rcvd.code == 4002

    first, second = open_socket(server, token), open_socket(server, token)
    with connect(ws_url(server), additional_headers=bearer(token), open_timeout=10) as third:
        with pytest.raises(ConnectionClosed) as closed:
            third.recv(timeout=5)
        assert closed.value.rcvd.code == 4009
    first.close()
    second.close()


def sse_messages(response: httpx.Response, count: int) -> list[dict]:
    """The first `count` SSE messages (comments and pings skipped) as {event, id, data}."""
    messages, current = [], {}
    for line in response.iter_lines():
        if not line:
            if current.get("data") is not None:
                messages.append(current)
                if len(messages) == count:
                    return messages
            current = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            current[name] = value.strip() if name != "data" else json.loads(value)
    return messages


def test_server_sent_events_resume_with_last_event_id(live):
    server = live()
    token = key(f"events:read:{STREAM}", f"events:publish:{STREAM}")
    ids = publish(server, token, [{"n": n} for n in range(6)])
    url = server.url(f"/gateway/v1/streams/{STREAM}/sse")
    query = {"from": "earliest", "filter": json.dumps({"field": "n", "op": "ne", "value": 2})}
    with httpx.stream("GET", url, params=query, headers=bearer(token), timeout=10) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith(
            "text/event-stream"
        )
        first = sse_messages(response, 3)
    assert [message["id"] for message in first] == [ids[0], ids[1], ids[3]]
    assert first[2]["data"]["payload"] == {"n": 3}
    headers = {**bearer(token), "Last-Event-ID": first[-1]["id"]}
    with httpx.stream("GET", url, params=query, headers=headers, timeout=10) as response:
        more = publish(server, token, [{"n": 6}])
        rest = sse_messages(response, 3)
    assert [message["id"] for message in rest] == ids[4:] + more

    refused = httpx.get(url, params={"filter": "{"}, headers=bearer(token))
    assert refused.status_code == 422 and refused.json()["field"] == "query.filter"
    assert (
        httpx.get(
            server.url("/gateway/v1/streams/nope/sse"), headers=bearer(key("admin", name="sse-admin"))
        ).status_code
        == 404
    )
    assert httpx.get(url).status_code == 401

    # A browser's EventSource sends no headers: a stream token in the query, never a key.
    minted = httpx.post(server.url("/gateway/v1/streams/tokens"), headers=bearer(token)).json()["token"]
    with httpx.stream("GET", url, params={"from": "earliest", "token": minted}, timeout=10) as response:
        assert response.status_code == 200
        assert sse_messages(response, 1)[0]["id"] == ids[0]
    assert httpx.get(url, params={"token": token}).status_code == 401


def test_the_cli_prints_live_events_and_resumes_after_the_gateway_restarts(live, backend, tmp_path):
    import os
    import subprocess
    import sys

    server = live()
    token = key(f"events:read:{STREAM}", f"events:publish:{STREAM}")
    before = publish(server, token, [{"n": n} for n in range(3)])
    output = open(tmp_path / "events.jsonl", "wb")  # noqa: SIM115
    cli = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "orchestration.cli",
            "events",
            "subscribe",
            STREAM,
            "--from",
            before[0],
            "--limit",
            "7",
            "--url",
            ws_url(server),
            "--filter",
            json.dumps({"field": "n", "op": "lt", "value": 100}),
        ],
        env={**os.environ, "JUNCTION_API_KEY": token},
        stdout=output,
        stderr=subprocess.PIPE,
    )
    from support import wait_until

    def printed() -> list[str]:
        return [json.loads(line)["id"] for line in (tmp_path / "events.jsonl").read_text().splitlines()]

    wait_until(lambda: len(printed()) == 2, 60, "the CLI to print the first events")
    port = server.port
    server.stop()  # the network drop: the gateway goes away, events keep being published
    from resources.event_stream import open_event_stream

    with open_event_stream() as events:
        during = [events.publish(STREAM, {"n": n}).id for n in range(3, 6)]
        events.publish(STREAM, {"n": 500})  # filtered out
    again = live(port=port)
    try:
        after = publish(again, token, [{"n": 6}, {"n": 7}])
        wait_until(lambda: cli.poll() is not None, 60, "the CLI to finish", detail=lambda: str(printed()))
    finally:
        cli.kill()
    assert cli.returncode == 0, cli.stderr.read().decode()
    assert printed() == before[1:] + during + after
    assert "resuming after" in cli.stderr.read().decode()


def test_the_javascript_client_subscribes_publishes_and_resumes(live, backend, tmp_path):
    import shutil
    import subprocess

    if shutil.which("node") is None:
        pytest.fail("node is needed to run the JavaScript client")
    server = live()
    token = key(f"events:read:{STREAM}", f"events:publish:{STREAM}")
    source = httpx.get(server.url("/gateway/live/junction-live.js"))
    assert source.status_code == 200 and source.headers["content-type"].startswith("text/javascript")
    (tmp_path / "junction-live.js").write_text(source.text)
    earlier = publish(server, token, [{"n": 1}, {"n": 2}])
    script = tmp_path / "client.js"
    script.write_text(
        """
const {JunctionLive} = require("./junction-live.js");
const [url, token, from] = process.argv.slice(2);
const seen = [];
const live = new JunctionLive(url, {token: async () => token});
live.subscribe("STREAM", {from}, async (event) => {
  seen.push(event.id);
  if (seen.length === 2) {
    const ack = await live.publish("STREAM", {n: 3});
    console.log(JSON.stringify({ack: ack.id}));
    live.socket.close(4999, "dropped by the test");  // the client reconnects and resumes
  }
  if (seen.length === 3) {
    console.log(JSON.stringify({seen}));
    live.close();
    process.exit(0);
  }
});
setTimeout(() => { console.log(JSON.stringify({timeout: seen})); process.exit(1); }, 20000);
""".replace("STREAM", STREAM)
    )
    run = subprocess.run(
        ["node", "--experimental-websocket", str(script), ws_url(server), token, "earliest"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    acknowledged = lines[0]["ack"]
    assert lines[1]["seen"] == earlier + [acknowledged]


@pytest.mark.parametrize("backend", ["redis"])  # two gateway processes share events through Redis
def test_a_client_of_either_gateway_sees_every_event(live, backend):
    first, second = live(), live()
    token = key(f"events:read:{STREAM}", f"events:publish:{STREAM}")
    with open_socket(first, token) as on_first, open_socket(second, token) as on_second:
        subscribe(on_first)
        subscribe(on_second)
        ids = publish(first, token, [{"n": n} for n in range(5)]) + publish(second, token, [{"n": 5}])
        assert [event["id"] for event in collect(on_first, 6)] == ids
        assert [event["id"] for event in collect(on_second, 6)] == ids
