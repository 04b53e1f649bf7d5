"""A local upstream API with the habits of real ones, for the REST source's tests (no network).

`/{style}/records` serves the same records with each pagination style: `page` (page numbers and
`total_pages`), `offset` (offset/limit and `total`), `cursor` (`next_cursor` in the body), `next`
(the next page's URL in the body), `link` (an RFC 8288 Link header, the body a bare list) and `single`
(one list). `?since=` keeps the records updated at or after it (incremental reads), `?ids=3,7`
only those records. Authentication
is one of: none, bearer, API key (header or query), basic, or OAuth2 client credentials
(`/oauth/token`); faults are set per page: statuses to answer first (429 with `Retry-After`, 503),
a body that is not JSON, an answer slower than the client's timeout.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import format_datetime, parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlparse


@dataclass
class Upstream:
    records: list[dict[str, Any]] = field(default_factory=list)
    page_size: int = 10
    auth: tuple[str, ...] = ("none",)  # ("bearer", token) | ("api_key_header", name, key) | ...
    faults: dict[tuple[str, int], list[int]] = field(default_factory=dict)  # (style, page) -> statuses
    retry_after: str = "1"
    not_json: set[tuple[str, int]] = field(default_factory=set)
    slow: dict[tuple[str, int], list[float]] = field(default_factory=dict)  # seconds, per attempt
    tokens: set[str] = field(default_factory=set)
    revoke_tokens_at: tuple[str, int] | None = None  # (style, page): the server forgets its tokens
    tokens_issued: int = 0
    requests: list[tuple[float, str, dict[str, list[str]], dict[str, str]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""
    # Child resources: GET /customers/<id>/orders, two per page ({"data", "page", "total_pages"}).
    children: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    child_delay: float = 0.0  # seconds each child page takes, to see requests overlap
    in_flight: int = 0
    most_in_flight: int = 0
    # Validators on answers: "etag" (a hash of the body), "last_modified" (the newest updated_at of the
    # page), or None; a conditional GET that matches is answered 304 without a body.
    validators: str | None = None
    cache_control: str | None = None  # sent as Cache-Control with every answer
    not_modified: int = 0  # 304s answered

    def requests_to(self, style: str) -> list[dict[str, list[str]]]:
        return [query for _, path, query, _ in self.requests if path == f"/{style}/records"]

    def set_records(self, count: int, updated_at: str = "2024-01-01T00:00:00Z") -> None:
        self.records = [
            {
                "id": index,
                "name": f"customer {index}",
                "status": "active",
                "updated_at": updated_at,
                "address": {"city": f"city {index % 3}", "geo": {"lat": index / 10}},
                "tags": ["a", "b"] if index % 2 else [],
            }
            for index in range(1, count + 1)
        ]


def _authorized(upstream: Upstream, headers: Any, query: dict[str, list[str]]) -> bool:
    kind, *values = upstream.auth
    if kind == "none":
        return True
    if kind == "bearer":
        return headers.get("Authorization") == f"Bearer {values[0]}"
    if kind == "api_key_header":
        return headers.get(values[0]) == values[1]
    if kind == "api_key_query":
        return query.get(values[0]) == [values[1]]
    if kind == "basic":
        expected = base64.b64encode(f"{values[0]}:{values[1]}".encode()).decode()
        return headers.get("Authorization") == f"Basic {expected}"
    if kind == "oauth2":
        header = headers.get("Authorization", "")
        return header.startswith("Bearer ") and header.removeprefix("Bearer ") in upstream.tokens
    raise AssertionError(kind)


def _page(
    upstream: Upstream, style: str, query: dict[str, list[str]]
) -> tuple[int, dict[str, str], Any, int]:
    """(status, headers, body, page number) of one answer."""
    since = query.get("since", [None])[0]
    records = [r for r in upstream.records if since is None or r["updated_at"] >= since]
    if "ids" in query:  # ?ids=3,7: only those records (an event-narrowed read)
        wanted = set(query["ids"][0].split(","))
        records = [r for r in records if str(r["id"]) in wanted]
    size = int(query.get("per_page", query.get("limit", [upstream.page_size]))[0])
    base = f"{upstream.url}/{style}/records"
    if style in ("page", "link"):
        page = int(query.get("page", ["1"])[0])
        chunk = records[(page - 1) * size : page * size]
        pages = max((len(records) + size - 1) // size, 1)
        if style == "page":
            return 200, {}, {"data": chunk, "page": page, "total_pages": pages}, page
        headers = {}
        if page < pages:
            following = {k: v[0] for k, v in query.items()} | {"page": str(page + 1)}
            headers["Link"] = f'<{base}?{urlencode(following)}>; rel="next", <{base}?page=1>; rel="first"'
        return 200, headers, chunk, page
    if style == "offset":
        offset = int(query.get("offset", ["0"])[0])
        return 200, {}, {"items": records[offset : offset + size], "total": len(records)}, offset // size + 1
    if style in ("cursor", "next"):
        after = int(query.get("cursor", query.get("after", ["0"]))[0])
        chunk = [r for r in records if r["id"] > after][:size]
        more = chunk and chunk[-1]["id"] < records[-1]["id"]
        page = sum(1 for r in records if r["id"] <= after) // size + 1
        if style == "cursor":
            return (
                200,
                {},
                {"records": chunk, "meta": {"next_cursor": str(chunk[-1]["id"]) if more else None}},
                page,
            )
        following = {k: v[0] for k, v in query.items()} | {"after": str(chunk[-1]["id"])} if more else None
        return (
            200,
            {},
            {"results": chunk, "next": f"{base}?{urlencode(following)}" if following else None},
            page,
        )
    if style == "single":
        return 200, {}, records, 1
    return 404, {}, {"title": "not found"}, 1


def start_upstream() -> tuple[Upstream, ThreadingHTTPServer]:
    upstream = Upstream()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _send(
            self, status: int, body: Any, headers: dict[str, str] | None = None, raw: bytes | None = None
        ) -> None:
            data = raw if raw is not None else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/html" if raw is not None else "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def _child_page(self, parent: int, page: int) -> None:
            with upstream.lock:
                upstream.in_flight += 1
                upstream.most_in_flight = max(upstream.most_in_flight, upstream.in_flight)
            try:
                time.sleep(upstream.child_delay)
                records = upstream.children.get(parent)
            finally:
                # Before the answer is written: once the client has it, it may send its next request
                # at once, and that one must not count this one as still in flight.
                with upstream.lock:
                    upstream.in_flight -= 1
            if records is None:
                self._send(404, {"title": f"no customer {parent}"})
                return
            pages = max((len(records) + 1) // 2, 1)
            self._send(200, {"data": records[(page - 1) * 2 : page * 2], "page": page, "total_pages": pages})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            form = parse_qs(self.rfile.read(length).decode())
            if self.path != "/oauth/token" or form.get("grant_type") != ["client_credentials"]:
                self._send(400, {"error": "unsupported_grant_type"})
                return
            _, client_id, client_secret = upstream.auth
            if form.get("client_id") != [client_id] or form.get("client_secret") != [client_secret]:
                self._send(401, {"error": "invalid_client"})
                return
            token = secrets.token_hex(8)
            with upstream.lock:
                upstream.tokens.add(token)
                upstream.tokens_issued += 1
            self._send(200, {"access_token": token, "token_type": "bearer", "expires_in": 3600})

        def do_GET(self) -> None:
            parsed = urlparse(self.path)
            query = parse_qs(parsed.query)
            with upstream.lock:
                upstream.requests.append((time.monotonic(), parsed.path, query, dict(self.headers)))
            style = parsed.path.strip("/").split("/")[0]
            parts = parsed.path.strip("/").split("/")
            if len(parts) == 3 and parts[0] == "customers" and parts[2] == "orders":
                self._child_page(int(parts[1]), int(query.get("page", ["1"])[0]))
                return
            if upstream.revoke_tokens_at is not None and query.get("page") == [
                str(upstream.revoke_tokens_at[1])
            ]:
                with upstream.lock:
                    upstream.tokens.clear()
                    upstream.revoke_tokens_at = None
            if not _authorized(upstream, self.headers, query):
                self._send(401, {"title": "unauthorized"})
                return
            status, headers, body, page = _page(upstream, style, query)
            key = (style, page)
            with upstream.lock:
                queued = upstream.faults.get(key)
                fault = queued.pop(0) if queued else None
                delays = upstream.slow.get(key)
                delay = delays.pop(0) if delays else 0.0
            if delay:
                time.sleep(delay)
            if fault is not None:
                self._send(
                    fault,
                    {"title": "try later"},
                    {"Retry-After": upstream.retry_after} if fault == 429 else {},
                )
            elif key in upstream.not_json:
                self._send(200, None, raw=b"<html><body>Bad gateway (proxy error page)</body></html>")
            elif status == 200 and (upstream.validators or upstream.cache_control):
                self._send_validated(body, headers)
            else:
                self._send(status, body, headers)

        def _send_validated(self, body: Any, headers: dict[str, str]) -> None:
            headers = dict(headers)
            if upstream.cache_control:
                headers["Cache-Control"] = upstream.cache_control
            unchanged = False
            if upstream.validators == "etag":
                headers["ETag"] = '"' + hashlib.sha256(json.dumps(body).encode()).hexdigest()[:16] + '"'
                unchanged = self.headers.get("If-None-Match") == headers["ETag"]
            elif upstream.validators == "last_modified":
                records = body["data"] if isinstance(body, dict) else body
                newest = max((r["updated_at"] for r in records), default="2000-01-01T00:00:00Z")
                moment = datetime.fromisoformat(newest.replace("Z", "+00:00"))
                headers["Last-Modified"] = format_datetime(moment, usegmt=True)
                asked = self.headers.get("If-Modified-Since")
                unchanged = asked is not None and parsedate_to_datetime(asked) >= moment
            if unchanged:
                with upstream.lock:
                    upstream.not_modified += 1
                self.send_response(304)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                return
            self._send(200, body, headers)

    class Server(ThreadingHTTPServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            import sys

            if not isinstance(sys.exc_info()[1], BrokenPipeError | ConnectionResetError):
                super().handle_error(request, client_address)

    server = Server(("127.0.0.1", 0), Handler)
    upstream.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return upstream, server
