"""One OpenAPI 3 document: the platform API and every proxied route (`/gateway/openapi.json`, shown by
`/gateway/docs`).

A route declaring `openapi: {url: ...}` or `{file: ...}` has the upstream's own document merged under
the route's path: each upstream path `P` becomes `/proxy<route path>P` (`strip_path: false`: `/proxy P`,
for the upstream paths under the route's path); its components are renamed `<route>__<name>` (every
`$ref` follows) so that two upstreams never collide; operation ids are prefixed with the route; each
operation needs the route's gateway credentials (a key or JWT with the route's scopes, unless the route
is open) together with any of the upstream's own schemes (renamed). A route without a document (or with
a `rewrite`, whose paths the upstream's document does not describe) is listed as one operation per
method that forwards everything under its path.

Documents are fetched off the request path (`ProxyApp.refresh_documents`: at each reload and every
`DOCUMENT_REFRESH_S`); the merged document is built once per configuration and set of documents.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from orchestration.gateway.proxy.config import METHODS, TEMPLATE_PARAMETER
from orchestration.gateway.proxy.routing import ProxyConfig, Route

DOCUMENT_REFRESH_S = 300.0
COMPONENT_SECTIONS = (
    "schemas",
    "responses",
    "parameters",
    "examples",
    "requestBodies",
    "headers",
    "securitySchemes",
    "links",
    "callbacks",
)
GATEWAY_SCHEMES = ("HTTPBearer", "APIKeyHeader")  # the platform API's (security.py)
OPERATION_METHODS = tuple(method.lower() for method in METHODS)
_REF = re.compile(r"^#/components/([A-Za-z]+)/(.+)$")


def merged_document(
    base: dict[str, Any], config: ProxyConfig, documents: dict[str, dict[str, Any]], prefix: str
) -> dict[str, Any]:
    """`base` (the platform API's document, not changed) with every route of `config` under `prefix`."""
    merged = copy.deepcopy(base)
    paths = merged.setdefault("paths", {})
    components = merged.setdefault("components", {})
    tags = merged.setdefault("tags", [])
    for route in sorted(config.routes, key=lambda route: route.name):
        tag = f"proxy: {route.name}"
        document = documents.get(route.name)
        upstream_name = route.spec.upstream or "its versions' upstreams"
        tags.append({"name": tag, "description": f"Proxied to upstream {upstream_name}."})
        if document is None or route.spec.rewrite is not None:
            paths[f"{prefix}{route.spec.path}"] = _forwarding_item(route, tag)
            continue
        renamed = _renamed_components(document.get("components") or {}, route.name)
        for section, entries in renamed.items():
            components.setdefault(section, {}).update(entries)
        for upstream_path, item in (document.get("paths") or {}).items():
            gateway_path = _gateway_path(route, upstream_path, prefix)
            if gateway_path is None:
                continue
            paths[gateway_path] = _merged_item(route, _with_refs_renamed(item, route.name), tag, document)
    return merged


def _gateway_path(route: Route, upstream_path: str, prefix: str) -> str | None:
    if not route.spec.strip_path:
        under = upstream_path == route.spec.path or upstream_path.startswith(
            route.spec.path.rstrip("/") + "/"
        )
        return f"{prefix}{upstream_path}" if under else None
    return f"{prefix}{route.spec.path.rstrip('/')}{'' if upstream_path == '/' else upstream_path}"


def _security(route: Route, upstream: list[dict[str, list[str]]] | None) -> list[dict[str, list[str]]]:
    """The gateway's credentials for the route (any of its schemes) AND any of the upstream's."""
    ours = [{scheme: []} for scheme in GATEWAY_SCHEMES] if route.scopes else [{}]
    theirs = [
        {f"{route.name}__{name}": scopes for name, scopes in requirement.items()}
        for requirement in upstream or [{}]
    ]
    combined = [{**mine, **other} for mine in ours for other in theirs]
    return [requirement for requirement in combined if requirement] or []


def _scopes_note(route: Route) -> str:
    if not route.scopes:
        return "Open: no gateway key needed."
    return "Needs a gateway key or JWT with the scope(s): " + ", ".join(
        f"`{scope}`" for scope in route.scopes
    )


def _merged_item(route: Route, item: dict[str, Any], tag: str, document: dict[str, Any]) -> dict[str, Any]:
    allowed = {method.lower() for method in route.spec.methods} if route.spec.methods else None
    merged = {key: value for key, value in item.items() if key not in OPERATION_METHODS}
    for method in OPERATION_METHODS:
        operation = item.get(method)
        if operation is None or (allowed is not None and method not in allowed):
            continue
        operation = dict(operation)
        operation["tags"] = [tag]
        if "operationId" in operation:
            operation["operationId"] = f"{route.name}__{operation['operationId']}"
        operation["security"] = _security(route, operation.get("security", document.get("security")))
        operation["description"] = "\n\n".join(
            part for part in (operation.get("description"), _scopes_note(route)) if part
        )
        merged[method] = operation
    return merged


def _forwarding_item(route: Route, tag: str) -> dict[str, Any]:
    methods = route.spec.methods or ["GET", "POST", "PUT", "PATCH", "DELETE"]
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in TEMPLATE_PARAMETER.findall(route.spec.path)
    ]
    item: dict[str, Any] = {"parameters": parameters} if parameters else {}
    for method in methods:
        item[method.lower()] = {
            "tags": [tag],
            "summary": f"{method} {route.spec.path} and every path below it",
            "operationId": f"proxy__{route.name}__{method.lower()}",
            "description": f"Forwarded to the route's upstream as it is. {_scopes_note(route)}",
            "security": _security(route, None),
            "responses": {"default": {"description": "The upstream's answer, or a gateway problem."}},
        }
    return item


def _renamed_components(components: dict[str, Any], route: str) -> dict[str, dict[str, Any]]:
    return {
        section: {f"{route}__{name}": _with_refs_renamed(value, route) for name, value in entries.items()}
        for section, entries in components.items()
        if section in COMPONENT_SECTIONS and isinstance(entries, dict)
    }


def _with_refs_renamed(value: Any, route: str) -> Any:
    if isinstance(value, dict):
        renamed = {}
        for key, item in value.items():
            if key == "$ref" and isinstance(item, str) and (found := _REF.match(item)):
                renamed[key] = f"#/components/{found.group(1)}/{route}__{found.group(2)}"
            else:
                renamed[key] = _with_refs_renamed(item, route)
        return renamed
    if isinstance(value, list):
        return [_with_refs_renamed(item, route) for item in value]
    return value
