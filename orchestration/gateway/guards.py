"""Request guards in front of every gateway route: client IP lists, body size, media type, headers.

Pure ASGI middleware (not `BaseHTTPMiddleware`) so that request bodies stream through untouched and
the size limit holds for chunked bodies without a Content-Length as well.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orchestration.gateway.problems import PROBLEM_MEDIA_TYPE, problem_type

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]
# The docs page needs its own scripts and styles; the API itself serves none.
API_CSP = (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'")
DOCS_CSP = (
    b"content-security-policy",
    b"default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; img-src 'self' data:",
)
BODY_METHODS = {"POST", "PUT", "PATCH"}


FORM_MEDIA_TYPE = "application/x-www-form-urlencoded"


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def _is_json(content_type: str) -> bool:
    media_type = _media_type(content_type)
    return media_type == "application/json" or media_type.endswith("+json")


async def send_problem(
    send: Send,
    status: int,
    title: str,
    slug: str,
    detail: str,
    path: str,
    headers: dict[str, str] | None = None,
) -> None:
    """A problem document answered from ASGI code (middleware, the reverse proxy)."""
    body = json.dumps(
        {"type": problem_type(slug), "title": title, "status": status, "detail": detail, "instance": path}
    )
    extra = [
        (name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in (headers or {}).items()
    ]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", PROBLEM_MEDIA_TYPE.encode()), *SECURITY_HEADERS, API_CSP, *extra],
        }
    )
    await send({"type": "http.response.body", "body": body.encode()})


class ClientNetworks:
    """Who may use the gateway by address (settings `gateway_allow_ips`, `gateway_deny_ips`): the
    platform API's guards and the reverse proxy ask the same."""

    def __init__(self, allow_networks: Iterable[str] = (), deny_networks: Iterable[str] = ()):
        self.allow = [ipaddress.ip_network(n, strict=False) for n in allow_networks]
        self.deny = [ipaddress.ip_network(n, strict=False) for n in deny_networks]

    def allows(self, host: str | None) -> bool:
        if not self.allow and not self.deny:
            return True
        try:
            address = ipaddress.ip_address(host or "")
        except ValueError:
            return (
                not self.allow
            )  # unknown peers (test clients, unix sockets) pass only without an allow list
        if any(address in network for network in self.deny):
            return False
        return not self.allow or any(address in network for network in self.allow)


class RequestGuards:
    """The platform API's guards: client addresses, the body limit, JSON bodies, security headers.
    (The reverse proxy applies the address lists and a body limit itself: `proxy/app.py`.)"""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        networks: ClientNetworks,
        docs_paths: Iterable[str] = (),
        form_paths: str | None = None,
    ):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.networks = networks
        self.docs_paths = set(docs_paths)
        # Paths (a regex) whose POST is an HTML form, such as the confirm page of an e-mail link.
        self.form_paths = re.compile(form_paths) if form_paths else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Starlette's mount convention: `path` is the whole path, `root_path` the part mounted above us.
        path, root = scope["path"], scope.get("root_path", "")
        relative_path = path[len(root) :] if root and path.startswith(root) else path
        client = scope.get("client")
        if not self.networks.allows(client[0] if client else None):
            await send_problem(
                send, 403, "Forbidden", "ip-denied", "your address may not use this gateway", path
            )
            return

        headers = {key.lower(): value for key, value in scope.get("headers", [])}
        declared_length = headers.get(b"content-length")
        if (
            declared_length is not None
            and declared_length.isdigit()
            and int(declared_length) > self.max_body_bytes
        ):
            await send_problem(
                send,
                413,
                "Content too large",
                "body-too-large",
                f"the limit is {self.max_body_bytes} bytes",
                path,
            )
            return
        has_body = (declared_length not in (None, b"0")) or b"transfer-encoding" in headers
        if scope["method"] in BODY_METHODS and has_body:
            content_type = headers.get(b"content-type", b"").decode("latin-1")
            is_form = (
                self.form_paths is not None
                and self.form_paths.match(relative_path) is not None
                and _media_type(content_type) == FORM_MEDIA_TYPE
            )
            if not _is_json(content_type) and not is_form:
                detail = f"send application/json, not {content_type or 'no content type'}"
                await send_problem(
                    send, 415, "Unsupported media type", "unsupported-media-type", detail, path
                )
                return

        received = 0
        refused = False  # the body went over the limit: we answered 413 and the app is cut off
        app_started = False

        async def limited_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes and not refused:
                    refused = True
                    if not app_started:  # else the app's own answer is under way: just cut it off
                        detail = f"the limit is {self.max_body_bytes} bytes"
                        await send_problem(send, 413, "Content too large", "body-too-large", detail, path)
            if refused:
                # The app sees the client go away; whatever it answers is dropped below.
                return {"type": "http.disconnect"}
            return message

        is_docs = relative_path in self.docs_paths

        async def send_with_headers(message: Message) -> None:
            nonlocal app_started
            if refused:
                return
            if message["type"] == "http.response.start":
                app_started = True
                present = {key.lower() for key, _ in message.get("headers", [])}
                extra = [
                    (k, v)
                    for k, v in (*SECURITY_HEADERS, DOCS_CSP if is_docs else API_CSP)
                    if k not in present
                ]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, limited_receive, send_with_headers)
