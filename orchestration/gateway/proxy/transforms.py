"""Request and response transformations of a proxy route (Kong's request- and response-transformer).

```yaml
routes:
  orders:
    transform:
      request:
        headers: {add: {X-Source: junction, X-Consumer: "{{ consumer }}"}, remove: [X-Debug], rename: {X-Old: X-New}}
        query: {add: {api_version: "2"}, remove: [debug]}
        body: {template: '{"order": {{ body | tojson }}, "via": "junction"}'}   # JSON in, JSON out
      response:
        headers: {add: {Cache-Control: "max-age=60"}, remove: [Server]}
        body: {select: "$.data"}                                                    # or a template
        status: {404: 204}
        max_body_bytes: 10485760
```

Header values, query values and body templates are the kernel's templates, with `route`, `consumer`
(the caller's principal, or null), `method`, `path`, `query` and, for a body, `body` (the parsed
JSON). A body `select` is a JSONPath (jsonpath-ng) whose first match becomes the body. Everything is
compiled when the routes file is read. A body transform reads the whole body: a request body that is
not JSON is 400, an upstream answer that is not JSON (or over `max_body_bytes`) is 502, each naming
the route.
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from orchestration.kernel.spec_errors import SpecError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _template(text: str) -> str:
    from orchestration.kernel.templates import compile_template

    try:
        compile_template(text)
    except SpecError as exc:
        raise ValueError(exc.problems[0].reason) from None
    return text


class HeaderOps(_Strict):
    add: dict[str, str] = Field(default_factory=dict, description="Set (templates); replaces a present one")
    remove: list[str] = Field(default_factory=list)
    rename: dict[str, str] = Field(default_factory=dict, description="old name -> new name")

    @field_validator("add")
    @classmethod
    def _templates(cls, values: dict[str, str]) -> dict[str, str]:
        return {name: _template(value) for name, value in values.items()}


class QueryOps(_Strict):
    add: dict[str, str] = Field(default_factory=dict, description="Set (templates)")
    remove: list[str] = Field(default_factory=list)

    @field_validator("add")
    @classmethod
    def _templates(cls, values: dict[str, str]) -> dict[str, str]:
        return {name: _template(value) for name, value in values.items()}


class BodyOps(_Strict):
    select: str | None = Field(default=None, description="JSONPath: its first match becomes the body")
    template: str | None = Field(default=None, description="A template rendering the new JSON body")

    @model_validator(mode="after")
    def _one(self) -> BodyOps:
        if (self.select is None) == (self.template is None):
            raise ValueError("give one of select or template")
        if self.select is not None:
            from jsonpath_ng.exceptions import JsonPathParserError
            from jsonpath_ng.ext import parse

            try:
                parse(self.select)
            except (JsonPathParserError, Exception) as exc:  # noqa: BLE001 - the parser raises several kinds
                raise ValueError(f"select: not a JSONPath ({exc})") from None
        if self.template is not None:
            _template(self.template)
        return self


class RequestTransformSpec(_Strict):
    headers: HeaderOps = Field(default_factory=HeaderOps)
    query: QueryOps = Field(default_factory=QueryOps)
    body: BodyOps | None = None


class ResponseTransformSpec(_Strict):
    headers: HeaderOps = Field(default_factory=HeaderOps)
    body: BodyOps | None = None
    status: dict[int, int] = Field(default_factory=dict, description="upstream status -> status answered")
    max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1, description="Of a body to transform")

    @field_validator("status")
    @classmethod
    def _statuses(cls, mapping: dict[int, int]) -> dict[int, int]:
        for status in (*mapping, *mapping.values()):
            if not 100 <= status <= 599:
                raise ValueError(f"{status} is not an HTTP status")
        return mapping


class TransformSpec(_Strict):
    request: RequestTransformSpec | None = None
    response: ResponseTransformSpec | None = None


class TransformFailed(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


class CompiledBody:
    def __init__(self, ops: BodyOps):
        self.template = ops.template
        self.select = None
        if ops.select is not None:
            from jsonpath_ng.ext import parse

            self.select = parse(ops.select)

    def apply(self, data: bytes, context: dict[str, Any]) -> bytes:
        """The new body; ValueError when `data` is not JSON or the template's output is not."""
        from orchestration.kernel.templates import TemplateRenderError, render

        try:
            body = orjson.loads(data) if data else None
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"the body is not JSON ({exc})") from None
        if self.select is not None:
            found = self.select.find(body)
            return orjson.dumps(found[0].value if found else None)
        try:
            text = render(self.template, {**context, "body": body})
        except TemplateRenderError as exc:
            raise ValueError(f"the body template failed: {exc}") from None
        try:
            return orjson.dumps(orjson.loads(text))
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"the body template did not render JSON ({exc})") from None


def _headers_applied(
    headers: list[tuple[str, str]], ops: HeaderOps, context: dict[str, Any]
) -> list[tuple[str, str]]:
    from orchestration.kernel.templates import render

    removed = {name.lower() for name in ops.remove} | {name.lower() for name in ops.add}
    renamed = {old.lower(): new for old, new in ops.rename.items()}
    kept = [
        (renamed.get(name.lower(), name), value) for name, value in headers if name.lower() not in removed
    ]
    return kept + [(name, render(value, context)) for name, value in ops.add.items()]


class RouteTransform:
    """A route's transformations, compiled (one per route, built with the configuration)."""

    def __init__(self, route: str, spec: TransformSpec):
        self.route = route
        self.request = spec.request
        self.response = spec.response
        self.request_body = CompiledBody(spec.request.body) if spec.request and spec.request.body else None
        self.response_body = (
            CompiledBody(spec.response.body) if spec.response and spec.response.body else None
        )

    def request_parts(
        self,
        headers: list[tuple[str, str]],
        query: list[tuple[str, str]],
        body: bytes,
        context: dict[str, Any],
    ) -> tuple[list[tuple[str, str]], list[tuple[str, str]], bytes]:
        """(headers, query, body) to send upstream; TransformFailed(400) for a body that is not JSON."""
        from orchestration.kernel.templates import render

        if self.request is None:
            return headers, query, body
        headers = _headers_applied(headers, self.request.headers, context)
        ops = self.request.query
        dropped = set(ops.remove) | set(ops.add)
        query = [(name, value) for name, value in query if name not in dropped]
        query += [(name, render(value, context)) for name, value in ops.add.items()]
        if self.request_body is not None:
            try:
                body = self.request_body.apply(body, context)
            except ValueError as exc:
                raise TransformFailed(400, f"route {self.route}: request body: {exc}") from None
            headers = [(name, value) for name, value in headers if name.lower() != "content-type"]
            headers.append(("content-type", "application/json"))
        return headers, query, body

    @property
    def reads_response_body(self) -> bool:
        return self.response_body is not None

    def response_status(self, status: int) -> int:
        return self.response.status.get(status, status) if self.response is not None else status

    def response_headers(
        self, headers: list[tuple[str, str]], context: dict[str, Any]
    ) -> list[tuple[str, str]]:
        if self.response is None:
            return headers
        return _headers_applied(headers, self.response.headers, context)

    def response_body_of(self, data: bytes, context: dict[str, Any]) -> bytes:
        try:
            return self.response_body.apply(data, context)
        except ValueError as exc:
            raise TransformFailed(502, f"route {self.route}: upstream answer: {exc}") from None
