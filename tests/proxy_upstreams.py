"""Local upstream servers for the reverse proxy's tests (no network): each answers JSON naming
itself and echoing the request, and can be told to answer an error, to be slow, or to go away."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Upstream:
    name: str
    server: ThreadingHTTPServer | None = None
    port: int = 0
    status: int = 200  # what it answers
    health_status: int = 200  # what it answers on /health
    probes: int = 0  # requests to /health
    delay_s: float = 0.0
    etag: str | None = None  # answered with this ETag; a matching If-None-Match is a 304
    document: dict[str, Any] | None = None  # its OpenAPI document, at /openapi.json (else 404 there)
    seen: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Upstream:
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                request = {
                    "target": upstream.name,
                    "method": self.command,
                    "path": self.path,
                    "headers": {name.lower(): value for name, value in self.headers.items()},
                    "body": body.decode(),
                }
                if self.path == "/openapi.json":
                    data = json.dumps(upstream.document).encode() if upstream.document else b""
                    self.send_response(200 if upstream.document else 404)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                if self.path == "/health":
                    with upstream.lock:
                        upstream.probes += 1
                    self.send_response(upstream.health_status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                with upstream.lock:
                    upstream.seen.append(request)
                if upstream.delay_s:
                    time.sleep(upstream.delay_s)
                if upstream.etag is not None and self.headers.get("If-None-Match") == upstream.etag:
                    self.send_response(304)
                    self.send_header("ETag", upstream.etag)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = json.dumps(request).encode()
                self.send_response(upstream.status)
                if upstream.etag is not None:
                    self.send_header("ETag", upstream.etag)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("X-Served-By", upstream.name)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        # A client that gave up (a proxy's timeout) is part of the tests, not an error to print.
        self.server.handle_error = lambda request, client_address: None
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Gone: connections to its port are refused (until `start` again, on the same port)."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def reset(self) -> None:
        self.status, self.delay_s, self.health_status, self.probes = 200, 0.0, 200, 0
        self.etag = None
        with self.lock:
            self.seen.clear()
        if self.server is None:
            self.start()


def start_upstreams(*names: str) -> dict[str, Upstream]:
    return {name: Upstream(name).start() for name in names}
