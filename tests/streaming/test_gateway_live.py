"""The stream endpoints and their Prometheus figures on a running platform (`junction dev`)."""

from __future__ import annotations

import httpx
import pytest
from support import bearer

pytestmark = pytest.mark.slow

ORDER = {"order_id": "live-1", "customer_id": "c-1", "amount": 10, "currency": "EUR"}


def test_publish_read_and_scrape_on_the_running_platform(live_platform, admin_key):
    with httpx.Client(
        base_url=f"{live_platform.base_url}/gateway", headers=bearer(admin_key), timeout=30
    ) as client:
        declared = {stream["name"] for stream in client.get("/v1/streams").json()["streams"]}
        assert {"orders", "platform.runs", "platform.assets"} <= declared

        published = client.post("/v1/streams/orders/events", json={"payload": ORDER})
        assert published.status_code == 201, published.text
        event_id = published.json()["results"][0]["id"]
        page = client.get("/v1/streams/orders/events", params={"limit": 1000}).json()
        assert {"id": event_id, "payload": ORDER} in [
            {"id": event["id"], "payload": event["payload"]} for event in page["events"]
        ]

        metrics = client.get("/metrics").text
        assert "junction_event_stream_up 1.0" in metrics
        retained = next(
            line
            for line in metrics.splitlines()
            if line.startswith('junction_stream_events_retained{stream="orders"}')
        )
        assert float(retained.rsplit(" ", 1)[1]) >= 1


def test_a_websocket_subscription_on_the_embedded_platform(live_platform, admin_key):
    """The combined server (gateway before the Dagster app) upgrades WebSockets under the gateway."""
    import json

    from websockets.sync.client import connect

    url = live_platform.base_url.replace("http", "ws", 1) + "/gateway/v1/streams/ws"
    with connect(url, additional_headers=bearer(admin_key), open_timeout=30) as socket:
        assert json.loads(socket.recv(timeout=10))["type"] == "welcome"
        # Other tests publish orders on this shared platform: only this test's order passes the filter.
        mine = {"field": "order_id", "op": "eq", "value": "live-ws"}
        socket.send(json.dumps({"type": "subscribe", "id": "s", "stream": "orders", "filter": mine}))
        assert json.loads(socket.recv(timeout=10))["type"] == "subscribed"
        order = {**ORDER, "order_id": "live-ws"}
        socket.send(json.dumps({"type": "publish", "ref": "p", "stream": "orders", "payload": order}))
        frames: dict[str, dict] = {}
        while len(frames) < 2:
            message = json.loads(socket.recv(timeout=10))
            if message["type"] != "ping":
                frames[message["type"]] = message
        assert frames["events"]["events"][0]["payload"] == order
        assert frames["published"]["id"] == frames["events"]["events"][0]["id"]
        metrics = httpx.get(
            f"{live_platform.base_url}/gateway/metrics", headers=bearer(admin_key), timeout=30
        )
        assert "junction_live_connections 1.0" in metrics.text
        assert 'junction_live_events_delivered_total{stream="orders"}' in metrics.text
