"""What the HTTP channels share: one POST, its answer classified, `Retry-After` honoured.

A 2xx is delivered; 408, 429 and 5xx are transient (retried, after the receiver's `Retry-After` when
it sent one); any other status is permanent. A receiver asking to wait longer than the channel's
`max_backoff_s` fails the delivery at once rather than holding the sender past its budget. Channels
whose service answers 200 with an error inside the body (Slack's `{"ok": false}`) override
`check_answer`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from resources.notifications.core import DeliveryFailure, NotificationChannel, retry_after_seconds

if TYPE_CHECKING:
    import httpx


def shown_url(url: str) -> str:
    """`url` without its query or credentials: those often carry tokens (a record must not)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def answer_text(response: httpx.Response) -> str:
    return f"HTTP {response.status_code}: {response.text[:500]}".rstrip(": ")


class HttpChannel(NotificationChannel):
    """A channel that delivers with one HTTP POST per message (or per recipient)."""

    timeout_s: float = 10.0

    def post(self, url: str, **request: Any) -> httpx.Response:
        """POST and classify the answer: the response when delivered, `DeliveryFailure` otherwise."""
        import httpx

        with httpx.Client(timeout=getattr(self.spec, "timeout_s", self.timeout_s)) as client:
            response = client.post(url, **request)
        self.check_answer(response)
        return response

    def check_answer(self, response: httpx.Response) -> None:
        if response.is_success:
            return
        status = response.status_code
        transient = status in (408, 429) or status >= 500
        retry_after = retry_after_seconds(response.headers.get("Retry-After")) if transient else None
        self.fail(answer_text(response), transient=transient, retry_after_s=retry_after)

    def fail(self, answer: str, *, transient: bool, retry_after_s: float | None = None) -> None:
        if retry_after_s is not None and retry_after_s > self.retry.max_backoff_s:
            reason = f"{answer} (asked to retry after {retry_after_s:g} s, more than max_backoff_s)"
            raise DeliveryFailure(reason, transient=False)
        raise DeliveryFailure(answer, transient=transient, retry_after_s=retry_after_s)

    def is_transient(self, exc: BaseException) -> bool:
        import httpx

        if isinstance(exc, httpx.UnsupportedProtocol | httpx.LocalProtocolError):
            return False  # the request itself is wrong
        if isinstance(exc, httpx.TransportError):
            return True  # connect/read errors and timeouts, a server that dropped the connection
        return super().is_transient(exc)
