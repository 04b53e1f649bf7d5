"""One OpenAPI document for the platform API and every proxied route: an upstream's own document
(fetched from its targets, or read from a file) merged under the route's path with its components
renamed and the route's credentials; a route without one listed as forwarding; still valid OpenAPI,
and shown by /docs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from openapi_spec_validator import validate
from proxy_upstreams import Upstream, start_upstreams
from support import wait_until

ORDERS_DOCUMENT = {
    "openapi": "3.1.0",
    "info": {"title": "Orders", "version": "2"},
    "paths": {
        "/items/{id}": {
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "get": {
                "operationId": "getItem",
                "security": [{"partnerKey": []}],
                "responses": {
                    "200": {
                        "description": "The item",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Item"}}},
                    }
                },
            },
            "delete": {"operationId": "deleteItem", "responses": {"204": {"description": "Gone"}}},
        }
    },
    "components": {
        "schemas": {
            "Item": {"type": "object", "properties": {"part": {"$ref": "#/components/schemas/Part"}}},
            "Part": {"type": "string"},
        },
        "securitySchemes": {"partnerKey": {"type": "apiKey", "in": "header", "name": "X-Partner-Key"}},
    },
}


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, Upstream]]:
    started = start_upstreams("orders", "bare")
    started["orders"].document = ORDERS_DOCUMENT
    yield started
    for server in started.values():
        server.stop()


def test_upstream_documents_merge_under_their_routes_with_renamed_components(
    gateway, tmp_path: Path, servers: dict[str, Upstream]
):
    (tmp_path / "reports.yaml").write_text(
        yaml.safe_dump(
            {
                "openapi": "3.1.0",
                "info": {"title": "Reports", "version": "1"},
                "paths": {"/reports/daily": {"get": {"responses": {"200": {"description": "Today's"}}}}},
            }
        )
    )
    routes = tmp_path / "routes.yaml"
    orders, bare = {"targets": [{"url": servers["orders"].url}]}, {"targets": [{"url": servers["bare"].url}]}
    routes.write_text(
        yaml.safe_dump(
            {
                "upstreams": {"orders": orders, "bare": bare},
                "routes": {
                    "orders": {
                        "path": "/orders",
                        "upstream": "orders",
                        "methods": ["GET"],
                        "openapi": {"url": "/openapi.json"},
                    },
                    "reports": {
                        "path": "/reports",
                        "upstream": "bare",
                        "strip_path": False,
                        "auth": {"type": "open"},
                        "openapi": {"file": "reports.yaml"},
                    },
                    "missing": {
                        "path": "/missing/{id}",
                        "upstream": "bare",
                        "openapi": {"url": "/openapi.json"},
                    },
                },
            }
        )
    )
    client = gateway(routes_file=routes)
    wait_until(
        lambda: "/proxy/orders/items/{id}" in client.get("/openapi.json").json()["paths"],
        5,
        "the proxy to reload",
    )
    document = client.get("/openapi.json").json()
    validate(document)
    assert "/v1/routes" in document["paths"], "the platform API is still there"

    item = document["paths"]["/proxy/orders/items/{id}"]
    assert set(item) == {"parameters", "get"}, "only the route's methods"
    operation = item["get"]
    assert operation["operationId"] == "orders__getItem"
    assert operation["tags"] == ["proxy: orders"]
    assert {"HTTPBearer": [], "orders__partnerKey": []} in operation["security"]
    assert "proxy:call:orders" in operation["description"]
    schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/orders__Item"}
    components = document["components"]
    assert (
        components["schemas"]["orders__Item"]["properties"]["part"]["$ref"]
        == "#/components/schemas/orders__Part"
    )
    assert components["securitySchemes"]["orders__partnerKey"]["name"] == "X-Partner-Key"

    daily = document["paths"]["/proxy/reports/daily"]["get"]
    assert daily.get("security") == [] and "Open" in daily["description"], "strip_path false: the path as is"

    # No document to be had: forwarding operations, and the reason in the proxy's status.
    missing = document["paths"]["/proxy/missing/{id}"]
    assert missing["parameters"][0]["name"] == "id" and "get" in missing and "delete" in missing
    assert "answered 404" in client.app.state.proxy.document_errors["missing"]

    docs = client.get("/docs")
    assert docs.status_code == 200 and "openapi.json" in docs.text
