"""Versioned proxy routes (by path, header and media type, with Deprecation and Sunset on old
versions) and request/response transformations (headers, query, JSON bodies by template or JSONPath,
status mapping), with bad JSON under a body transform answered as a problem naming the route."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import yaml
from proxy_upstreams import Upstream, start_upstreams

from orchestration.kernel.spec_errors import SpecError

OPEN = {"type": "open"}


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, Upstream]]:
    started = start_upstreams("old", "new")
    yield started
    for server in started.values():
        server.stop()


@pytest.fixture
def proxy(gateway, tmp_path: Path, servers):
    for server in servers.values():
        server.reset()
    upstreams = {name: {"targets": [{"url": server.url}]} for name, server in servers.items()}

    def build(routes: dict):
        path = tmp_path / "routes.yaml"
        path.write_text(yaml.safe_dump({"upstreams": upstreams, "routes": routes}))
        return gateway(routes_file=path)

    return build


def versions(by: str, **extra) -> dict:
    return {
        "by": by,
        "versions": {
            "v1": {"upstream": "old", "deprecated": "2026-01-01", "sunset": "2026-12-31"},
            "v2": {"upstream": "new"},
        },
        **extra,
    }


def test_versions_by_path_go_to_their_upstreams_and_old_ones_say_so(proxy):
    client = proxy(
        {"customers": {"path": "/customers", "versions": versions("path", default="v2"), "auth": OPEN}}
    )
    old = client.get("/proxy/customers/v1/7")
    assert old.json()["target"] == "old" and old.json()["path"] == "/7", "the version segment is taken out"
    assert old.headers["deprecation"] == "@1767225600"
    assert old.headers["sunset"] == "Thu, 31 Dec 2026 00:00:00 GMT"
    new = client.get("/proxy/customers/v2/7")
    assert new.json()["target"] == "new" and "deprecation" not in new.headers
    assert client.get("/proxy/customers/7").json()["target"] == "new", "none named: the default"


def test_versions_by_header_and_media_type(proxy):
    client = proxy(
        {
            "by-header": {"path": "/h", "versions": versions("header"), "auth": OPEN},
            "by-media": {"path": "/m", "versions": versions("media_type"), "auth": OPEN},
        }
    )
    assert client.get("/proxy/h/x", headers={"API-Version": "1"}).json()["target"] == "old"
    assert client.get("/proxy/h/x", headers={"API-Version": "v2"}).json()["target"] == "new"
    unknown = client.get("/proxy/h/x", headers={"API-Version": "9"})
    assert unknown.status_code == 404 and unknown.headers["content-type"] == "application/problem+json"
    assert unknown.json()["detail"] == "route by-header: no version '9' (versions: v1, v2)"
    assert "no version asked" in client.get("/proxy/h/x").json()["detail"], "no default: 404"
    accept = {"Accept": "application/vnd.example.v1+json"}
    assert client.get("/proxy/m/x", headers=accept).json()["target"] == "old"
    assert (
        client.get("/proxy/m/x", headers={"Accept": "application/json; version=2"}).json()["target"] == "new"
    )


def test_requests_and_answers_are_transformed(proxy, servers):
    client = proxy(
        {
            "orders": {
                "path": "/orders",
                "upstream": "new",
                "auth": OPEN,
                "transform": {
                    "request": {
                        "headers": {
                            "add": {"X-Source": "junction {{ route }}"},
                            "remove": ["X-Debug"],
                            "rename": {"X-Old": "X-New"},
                        },
                        "query": {"add": {"api_version": "2"}, "remove": ["debug"]},
                        "body": {"template": '{"order": {{ body | tojson }}, "via": "{{ method }}"}'},
                    },
                    "response": {
                        "headers": {"add": {"Cache-Control": "max-age=60"}, "remove": ["X-Served-By"]},
                        "body": {"select": "$.body"},
                        "status": {200: 201},
                    },
                },
            }
        }
    )
    answer = client.post(
        "/proxy/orders?debug=1&keep=yes",
        content=b'{"id": 7}',
        headers={"X-Debug": "1", "X-Old": "v", "Content-Type": "text/plain"},
    )
    assert answer.status_code == 201, answer.text
    assert answer.headers["cache-control"] == "max-age=60" and "x-served-by" not in answer.headers
    sent = servers["new"].seen[-1]
    assert sent["path"] == "/?keep=yes&api_version=2"
    assert sent["headers"]["x-source"] == "junction orders" and sent["headers"]["x-new"] == "v"
    assert "x-debug" not in sent["headers"] and "x-old" not in sent["headers"]
    assert sent["headers"]["content-type"] == "application/json"
    assert orjson.loads(answer.json()) == {"order": {"id": 7}, "via": "POST"}, (
        "the upstream's echo of the body"
    )


def test_bad_json_under_a_body_transform_is_a_problem_naming_the_route(proxy, servers):
    client = proxy(
        {
            "in": {
                "path": "/in",
                "upstream": "new",
                "auth": OPEN,
                "transform": {"request": {"body": {"select": "$.x"}}},
            },
            "out": {
                "path": "/out",
                "upstream": "new",
                "auth": OPEN,
                "transform": {"response": {"body": {"template": "{{ body.target }} is not JSON"}}},
            },
        }
    )
    refused = client.post("/proxy/in", content=b"not json")
    assert (
        refused.status_code == 400
        and "route in: request body: the body is not JSON" in refused.json()["detail"]
    )
    assert not servers["new"].seen, "nothing sent upstream"
    bad = client.get("/proxy/out")
    assert bad.status_code == 502 and bad.headers["content-type"] == "application/problem+json"
    assert "route out: upstream answer: the body template did not render JSON" in bad.json()["detail"]


@pytest.mark.parametrize(
    ("route", "problem"),
    [
        ({"path": "/r"}, "routes.r: give one of upstream or versions"),
        (
            {"path": "/r", "versions": {"versions": {"v1": {"upstream": "gone"}}}},
            "routes.r.versions.versions.v1.upstream: no upstream 'gone'",
        ),
        (
            {"path": "/r", "versions": {"default": "v3", "versions": {"v1": {"upstream": "old"}}}},
            "routes.r.versions: default: 'v3' is not one of",
        ),
        (
            {"path": "/r", "upstream": "old", "transform": {"response": {"body": {}}}},
            "routes.r.transform.response.body: give one of select or template",
        ),
        (
            {
                "path": "/r",
                "upstream": "old",
                "transform": {"request": {"headers": {"add": {"X": "{{ oops"}}}},
            },
            "routes.r.transform.request.headers.add: template syntax error",
        ),
        (
            {"path": "/r", "upstream": "old", "transform": {"response": {"status": {200: 999}}}},
            "routes.r.transform.response.status: 999 is not an HTTP status",
        ),
    ],
)
def test_bad_versions_and_transforms_name_the_field(tmp_path, servers, route, problem):
    from orchestration.gateway.proxy.app import ProxyApp

    path = tmp_path / "routes.yaml"
    upstreams = {"old": {"targets": [{"url": servers["old"].url}]}}
    path.write_text(yaml.safe_dump({"upstreams": upstreams, "routes": {"r": route}}))
    with pytest.raises(SpecError) as caught:
        ProxyApp(path)
    assert f"routes.yaml: {problem}" in str(caught.value)
