"""The gateway's stream endpoints on an in-process gateway: scopes, per-item results, pages, gaps,
audit, Redis publish-then-read, and a 503 (never a silent drop) when Redis is down."""

from __future__ import annotations

import pytest
from support import bearer, free_port

from orchestration.kernel import audit
from orchestration.kernel.principals import create_api_key
from orchestration.kernel.spec_errors import SpecError
from resources.event_stream import EventId, StreamRegistry, StreamSpec

ORDER_SCHEMA = {
    "type": "object",
    "required": ["order_id", "amount"],
    "properties": {"order_id": {"type": "string"}, "amount": {"type": "number", "minimum": 0}},
}


@pytest.fixture
def gateway(gateway, store_url: str):
    """The root conftest's in-process gateway, on a store declaring the streams these tests use."""
    registry = StreamRegistry.for_url(store_url)
    registry.upsert(StreamSpec(name="orders", payload_schema=ORDER_SCHEMA))
    registry.upsert(StreamSpec(name="clicks", retention={"max_count": 2}))
    return gateway


def key(*scopes: str) -> dict[str, str]:
    _, secret = create_api_key(f"k-{len(scopes)}-{free_port()}", scopes=scopes, created_by="test")
    return bearer(secret)


def order(n: int) -> dict:
    return {"payload": {"order_id": f"o{n}", "amount": n}}


def test_publish_one_or_many_with_per_item_results(gateway):
    client = gateway()
    publisher = key("events:publish:orders")

    one = client.post("/v1/streams/orders/events", json=order(1), headers=publisher)
    assert one.status_code == 201, one.text
    assert one.json()["results"][0]["status"] == "accepted"

    mixed = client.post(
        "/v1/streams/orders/events",
        json=[
            order(2),
            {"payload": {"order_id": "o3", "amount": -1}},
            {**order(4), "idempotency_key": "k4"},
            {**order(4), "idempotency_key": "k4"},
        ],
        headers=publisher,
    )
    assert mixed.status_code == 207, mixed.text
    body = mixed.json()
    assert [item["status"] for item in body["results"]] == ["accepted", "rejected", "accepted", "duplicate"]
    assert body["results"][1]["reason"] == "payload.amount: -1 is less than the minimum of 0"
    assert body["results"][3]["id"] == body["results"][2]["id"]
    assert (body["accepted"], body["duplicates"], body["rejected"]) == (2, 1, 1)

    rejected = client.post("/v1/streams/orders/events", json=[{"payload": {"amount": 1}}], headers=publisher)
    assert rejected.status_code == 422
    assert rejected.json()["field"] == "body[0].payload"
    assert "order_id" in rejected.json()["detail"]

    # One audit entry per call, whatever the number of events in it.
    entries = audit.query(action="events.publish", target="stream:orders")
    assert len(entries) == 3
    assert entries[1].details["accepted"] == 2 and entries[1].details["rejected"] == 1


def test_scopes_name_the_stream(gateway):
    client = gateway()
    reader = key("events:read:orders")
    assert client.post("/v1/streams/orders/events", json=order(1), headers=reader).status_code == 403
    assert client.get("/v1/streams/orders/events", headers=reader).status_code == 200
    assert client.get("/v1/streams/clicks/events", headers=reader).status_code == 403
    assert client.get("/v1/streams/orders/stats", headers=reader).status_code == 200
    # Listing every stream needs the stream-wide scope.
    assert client.get("/v1/streams", headers=reader).status_code == 403
    assert client.post("/v1/streams/orders/events", json=order(1)).status_code == 401
    # An unknown stream: 404 for a key that may touch any stream, 403 for one that may not.
    anywhere = key("events:publish", "events:read")
    assert client.post("/v1/streams/nope/events", json=order(1), headers=anywhere).status_code == 404
    assert client.get("/v1/streams/nope/events", headers=anywhere).status_code == 404
    assert client.get("/v1/streams/nope/events", headers=reader).status_code == 403


def test_read_pages_list_and_stats(gateway):
    client = gateway()
    headers = key("events:publish", "events:read")
    published = client.post(
        "/v1/streams/orders/events", json=[order(n) for n in range(5)], headers=headers
    ).json()
    ids = [item["id"] for item in published["results"]]

    page = client.get("/v1/streams/orders/events", params={"limit": 3}, headers=headers).json()
    assert [event["id"] for event in page["events"]] == ids[:3]
    assert page["events"][0]["payload"] == {"order_id": "o0", "amount": 0}
    rest = client.get("/v1/streams/orders/events", params={"from": page["next"]}, headers=headers).json()
    assert [event["id"] for event in rest["events"]] == ids[3:]
    assert rest["next"] == ids[-1]
    # A time reads from the first event published at or after it.
    first_time = page["events"][0]["time"]
    by_time = client.get("/v1/streams/orders/events", params={"from": first_time}, headers=headers).json()
    assert by_time["events"][0]["id"] == ids[0]
    for bad_cursor in ("yesterday", "1-99999999999999999999", "99999999999999999999999"):
        bad = client.get("/v1/streams/orders/events", params={"from": bad_cursor}, headers=headers)
        assert bad.status_code == 422 and bad.json()["field"] == "query.from", bad_cursor

    stats = client.get("/v1/streams/orders/stats", headers=headers).json()
    assert (stats["length"], stats["last_id"]) == (5, ids[-1])
    listed = client.get("/v1/streams", headers=headers).json()["streams"]
    assert {s["name"]: s["stats"]["length"] for s in listed} == {"clicks": 0, "orders": 5}


def test_lost_events_are_a_410_naming_the_range(gateway):
    from resources.event_stream import open_event_stream

    client = gateway()
    headers = key("events:publish:clicks", "events:read:clicks")
    ids = [
        item["id"]
        for item in client.post(
            "/v1/streams/clicks/events", json=[{"payload": n} for n in range(5)], headers=headers
        ).json()["results"]
    ]
    with open_event_stream() as events:
        events.trim("clicks")
    lost = client.get("/v1/streams/clicks/events", params={"from": ids[0]}, headers=headers)
    assert lost.status_code == 410, lost.text
    assert f"events {EventId.parse(ids[0]).next()} .. {ids[2]}" in lost.json()["detail"]
    resumed = client.get("/v1/streams/clicks/events", params={"from": ids[2]}, headers=headers).json()
    assert [event["id"] for event in resumed["events"]] == ids[3:]


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_publish_then_read_on_redis(gateway, clean_redis_url):
    client = gateway(redis_url=clean_redis_url)
    headers = key("events:publish:orders", "events:read:orders")
    results = client.post("/v1/streams/orders/events", json=[order(1), order(2)], headers=headers)
    assert results.status_code == 201, results.text
    read = client.get("/v1/streams/orders/events", headers=headers).json()
    assert [event["payload"]["order_id"] for event in read["events"]] == ["o1", "o2"]
    assert client.get("/v1/streams/orders/stats", headers=headers).json()["length"] == 2


def test_declare_a_stream_through_the_api(gateway):
    client = gateway()
    manager = key("events:manage:invoices", "events:publish:invoices")
    body = {
        "description": "Invoices sent",
        "payload_schema": {"type": "object", "required": ["invoice_id"]},
        "retention": {"max_count": 1000, "max_age": "7d"},
        "idempotency_window": "1h",
    }
    declared = client.put("/v1/streams/invoices", json=body, headers=manager)
    assert declared.status_code == 200, declared.text
    assert declared.json()["retention"] == {"max_count": 1000, "max_age_seconds": 7 * 86400}
    assert (declared.json()["idempotency_window_seconds"], declared.json()["origin"]) == (3600, "api")
    published = client.post(
        "/v1/streams/invoices/events", json=[{"payload": {"invoice_id": 1}}, {"payload": {}}], headers=manager
    )
    assert published.status_code == 207, published.text
    assert "invoice_id" in published.json()["results"][1]["reason"]

    changed = client.put("/v1/streams/invoices", json={"description": "v2"}, headers=manager)
    assert changed.json()["description"] == "v2" and changed.json()["payload_schema"] is None

    bad_schema = client.put("/v1/streams/invoices", json={"payload_schema": {"type": 5}}, headers=manager)
    assert bad_schema.status_code == 422
    assert bad_schema.json()["detail"].startswith("body.payload_schema: ")
    bad_age = client.put("/v1/streams/invoices", json={"retention": {"max_age": "soon"}}, headers=manager)
    assert bad_age.status_code == 422 and "body.retention.max_age" in bad_age.json()["detail"]
    assert client.put("/v1/streams/orders", json={}, headers=manager).status_code == 403
    assert audit.query(action="stream.declare")


def test_a_stream_declared_in_yaml_is_changed_in_its_file_not_through_the_api(gateway, store_url, tmp_path):
    folder = tmp_path / "streams"
    folder.mkdir()
    (folder / "shipments.yaml").write_text(
        "name: shipments\ndescription: from YAML\nretention: {max_count: 10}\n"
    )
    StreamRegistry.for_url(store_url).sync_declared(folder)
    client = gateway(streams_dir=folder)
    manager = key("events:manage", "events:read")

    refused = client.put("/v1/streams/shipments", json={"description": "from the API"}, headers=manager)
    assert refused.status_code == 409, refused.text
    assert refused.headers["content-type"] == "application/problem+json"
    problem = refused.json()
    assert (problem["type"], problem["field"]) == ("urn:junction:problem:declared-in-yaml", "path.name")
    assert (
        f"declared in the file {folder / 'shipments.yaml'} (origin 'yaml:shipments.yaml')"
        in problem["detail"]
    )
    assert not audit.query(action="stream.declare")

    # The origin shows on the stream and in the list; the YAML declaration stands.
    shipments = client.get("/v1/streams/shipments", headers=manager)
    assert shipments.status_code == 200, shipments.text
    assert shipments.json()["origin"] == "yaml:shipments.yaml"
    assert (shipments.json()["description"], shipments.json()["retention"]["max_count"]) == ("from YAML", 10)
    assert shipments.json()["stats"]["length"] == 0
    assert client.put("/v1/streams/parcels", json={}, headers=manager).json()["origin"] == "api"
    listed = {s["name"]: s["origin"] for s in client.get("/v1/streams", headers=manager).json()["streams"]}
    assert listed == {"clicks": "api", "orders": "api", "parcels": "api", "shipments": "yaml:shipments.yaml"}
    assert client.get("/v1/streams/nope", headers=manager).status_code == 404
    assert client.get("/v1/streams/shipments", headers=key("events:read:orders")).status_code == 403

    # The next sync leaves the API's stream alone, and a file declaring it fails naming file and stream.
    (folder / "parcels.yaml").write_text("name: parcels\n")
    with pytest.raises(SpecError, match=r"parcels.yaml: name: stream 'parcels' is declared through the API"):
        StreamRegistry.for_url(store_url).sync_declared(folder)


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_redis_down_is_a_503(gateway):
    client = gateway(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    headers = key("events:publish:orders", "events:read:orders")
    for response in (
        client.post("/v1/streams/orders/events", json=order(1), headers=headers),
        client.get("/v1/streams/orders/events", headers=headers),
        client.get("/v1/streams/orders/stats", headers=headers),
    ):
        assert response.status_code == 503, response.text
        assert response.json()["type"] == "urn:junction:problem:stream-unavailable"
        assert "unreachable" in response.json()["detail"]
    # Nothing was published, so nothing is audited as published.
    assert audit.query(action="events.publish") == []


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_stream_figures_for_prometheus(gateway):
    from orchestration.gateway.api.analytics import stream_figures, stream_metric_families
    from resources.event_stream import open_event_stream

    with open_event_stream() as events:
        events.publish("clicks", {"n": 1})
        up, streams = stream_figures(events)
    assert up
    families = {family.name: family for family in stream_metric_families(streams)}
    retained = {
        sample.labels["stream"]: sample.value
        for sample in families["junction_stream_events_retained"].samples
    }
    assert retained == {"clicks": 1, "orders": 0}

    from resources.event_stream.redis_backend import RedisEventStream

    down = RedisEventStream(f"redis://127.0.0.1:{free_port()}/0", events.registry)
    assert stream_figures(down) == (False, [])
    down.close()
