"""The proxy's admin API (`/v1/routes`, `/v1/upstreams`): objects declared through it proxy at once
and in every gateway on the same store within seconds; one owner per object (a write to one of the
routes file is 409 naming the file, a file declaring one of the API's is refused); every write is
checked with the other objects, answered in problem+json, and audited."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from proxy_upstreams import Upstream, start_upstreams
from support import bearer, wait_until

from orchestration.kernel import audit

PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, Upstream]]:
    started = start_upstreams("a", "b")
    yield started
    for server in started.values():
        server.stop()


@pytest.fixture
def routes_file(tmp_path: Path, servers: dict[str, Upstream]) -> Path:
    path = tmp_path / "routes.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "upstreams": {"from-file": {"targets": [{"url": servers["a"].url}]}},
                "routes": {"filed": {"path": "/filed", "upstream": "from-file", "auth": {"type": "open"}}},
            }
        )
    )
    return path


@pytest.fixture
def admin(gateway, routes_file: Path, make_key, monkeypatch):
    from orchestration.gateway.proxy import app as proxy_app

    monkeypatch.setattr(proxy_app, "RELOAD_CHECK_S", 0.05)
    client = gateway(routes_file=routes_file)
    client.headers.update(bearer(make_key("proxy-admin", "gateway:manage")))
    return client


def test_objects_declared_through_the_api_proxy_at_once_and_in_other_gateways(
    admin, gateway, routes_file: Path, servers: dict[str, Upstream]
):
    other = gateway(routes_file=routes_file)  # a second gateway on the same store
    b = servers["b"]
    created = admin.put("/v1/upstreams/from-api", json={"targets": [{"url": b.url}]})
    assert created.status_code == 201, created.text
    assert created.json()["origin"] == "api"
    route = {"path": "/api-made", "upstream": "from-api", "auth": {"type": "open"}}
    assert admin.put("/v1/routes/api-made", json=route).status_code == 201
    assert admin.get("/proxy/api-made/x").json()["target"] == "b", "applied in this gateway at once"
    wait_until(lambda: other.get("/proxy/api-made/x").status_code == 200, 5, "and in the other soon")
    # An API route may use the file's upstream; a replacement is 200.
    replaced = admin.put("/v1/routes/api-made", json={**route, "upstream": "from-file"})
    assert replaced.status_code == 200
    assert admin.get("/proxy/api-made/x").json()["target"] == "a"

    listed = {item["name"]: item["origin"] for item in admin.get("/v1/routes").json()["routes"]}
    assert listed == {"filed": "yaml:routes.yaml", "api-made": "api"}
    upstreams = {item["name"]: item for item in admin.get("/v1/upstreams").json()["upstreams"]}
    assert upstreams["from-file"]["origin"] == "yaml:routes.yaml"
    assert upstreams["from-api"]["state"]["targets"][0]["url"] == b.url
    assert admin.get("/v1/routes/api-made").json()["spec"]["upstream"] == "from-file"

    assert admin.delete("/v1/routes/api-made").status_code == 204
    assert admin.get("/proxy/api-made/x").status_code == 404
    assert admin.delete("/v1/upstreams/from-api").status_code == 204
    assert admin.get("/v1/upstreams/from-api").status_code == 404
    actions = [entry.action for entry in audit.query(actor="proxy-admin", limit=10)]
    assert actions == [
        "proxy.upstream.delete",
        "proxy.route.delete",
        "proxy.route.declare",
        "proxy.route.declare",
        "proxy.upstream.declare",
    ]


def test_an_object_of_the_routes_file_is_409_naming_the_file(admin, routes_file: Path):
    for method, path in [("PUT", "/v1/routes/filed"), ("DELETE", "/v1/routes/filed")]:
        answer = admin.request(
            method, path, json={"path": "/x", "upstream": "from-file"} if method == "PUT" else None
        )
        assert answer.status_code == 409, answer.text
        assert answer.headers["content-type"].startswith(PROBLEM)
        assert str(routes_file) in answer.json()["detail"]
        assert answer.json()["type"].endswith("declared-in-yaml")
    answer = admin.put("/v1/upstreams/from-file", json={"targets": [{"url": "http://127.0.0.1:1"}]})
    assert answer.status_code == 409 and "routes.yaml" in answer.json()["detail"]


def test_a_file_declaring_an_object_of_the_api_is_refused_and_the_api_keeps_it(
    admin, routes_file: Path, servers: dict[str, Upstream]
):
    route = {"path": "/mine", "upstream": "from-file", "auth": {"type": "open"}}
    assert admin.put("/v1/routes/mine", json=route).status_code == 201
    document = yaml.safe_load(routes_file.read_text())
    document["routes"]["mine"] = {"path": "/theirs", "upstream": "from-file", "auth": {"type": "open"}}
    document["routes"]["added"] = {"path": "/added", "upstream": "from-file", "auth": {"type": "open"}}
    routes_file.write_text(yaml.safe_dump(document))
    proxy = admin.app.state.proxy
    wait_until(lambda: proxy.status()["last_error"] is not None, 5, "the proxy to reload")
    assert (
        "routes.yaml: routes.mine: route 'mine' is declared through the admin API"
        in proxy.status()["last_error"]
    )
    assert admin.get("/proxy/mine").status_code == 200, "the API's route stays"
    assert admin.get("/proxy/theirs").status_code == 404 and admin.get("/proxy/added").status_code == 404


def test_writes_are_checked_with_the_other_objects(admin):
    unknown = admin.put("/v1/routes/lost", json={"path": "/lost", "upstream": "nowhere"})
    assert unknown.status_code == 422 and unknown.headers["content-type"].startswith(PROBLEM)
    assert unknown.json()["field"] == "body.upstream"
    assert "no upstream 'nowhere'" in unknown.json()["detail"]
    bad = admin.put("/v1/upstreams/odd", json={"targets": [{"url": "http://x"}], "algorithm": "random"})
    assert bad.status_code == 422 and bad.json()["field"] == "body.algorithm"
    assert admin.put("/v1/routes/Bad Name", json={"path": "/x", "upstream": "from-file"}).status_code == 422

    assert (
        admin.put("/v1/upstreams/used", json={"targets": [{"url": "http://127.0.0.1:1"}]}).status_code == 201
    )
    assert admin.put("/v1/routes/user", json={"path": "/user", "upstream": "used"}).status_code == 201
    in_use = admin.delete("/v1/upstreams/used")
    assert in_use.status_code == 409 and "routes.user.upstream" in in_use.json()["detail"]
    assert admin.delete("/v1/routes/never").status_code == 404


def test_the_admin_api_needs_gateway_manage(gateway, routes_file: Path, make_key):
    client = gateway(routes_file=routes_file)
    assert client.get("/v1/routes").status_code == 401
    other = bearer(make_key("proxy-caller", "proxy:call"))
    assert client.get("/v1/routes", headers=other).status_code == 403
    refused = client.put("/v1/routes/x", headers=other, json={"path": "/x", "upstream": "from-file"})
    assert refused.status_code == 403
