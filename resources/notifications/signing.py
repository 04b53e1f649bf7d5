"""Webhook signatures: `X-Junction-Signature: v1=<hex HMAC-SHA256 of "<timestamp>.<body>">`.

The Unix timestamp travels in `X-Junction-Timestamp`; receivers check both with `verify_signature()`,
which rejects a timestamp outside the tolerance so a captured request cannot be replayed later. The
webhook channel and the event stream's webhook subscriptions sign this way.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping

from orchestration.errors import JunctionError

SIGNATURE_HEADER = "X-Junction-Signature"
TIMESTAMP_HEADER = "X-Junction-Timestamp"
DELIVERY_HEADER = "X-Junction-Delivery"
SIGNATURE_VERSION = "v1"


class WebhookSignatureError(JunctionError):
    """A webhook request's signature or timestamp did not verify."""


def sign_payload(secret: str | bytes, timestamp: int | str, body: bytes) -> str:
    """The `X-Junction-Signature` value: `v1=` + hex HMAC-SHA256 of `<timestamp>.<body>`."""
    key = secret.encode() if isinstance(secret, str) else secret
    digest = hmac.new(key, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"{SIGNATURE_VERSION}={digest}"


def verify_signature(
    secret: str | bytes,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance_s: float = 300,
    now: float | None = None,
) -> None:
    """Check a received webhook; raise `WebhookSignatureError` saying why it is not authentic.

    Raises rather than returning a bool, so a receiver cannot ignore the answer by mistake.
    `headers` may be any mapping (case-insensitive ones are not required). The signature header
    may list several comma-separated signatures (a sender rotating secrets): one match suffices.
    """
    timestamp_text = _header(headers, TIMESTAMP_HEADER)
    signatures = _header(headers, SIGNATURE_HEADER)
    if timestamp_text is None or signatures is None:
        raise WebhookSignatureError(f"missing {TIMESTAMP_HEADER} or {SIGNATURE_HEADER} header")
    try:
        timestamp = int(timestamp_text)
    except ValueError:
        raise WebhookSignatureError(f"{TIMESTAMP_HEADER} is not a Unix timestamp") from None
    now = time.time() if now is None else now
    if abs(now - timestamp) > tolerance_s:
        raise WebhookSignatureError(
            f"timestamp is {now - timestamp:+.0f} s off (tolerance {tolerance_s:g} s)"
        )
    expected = sign_payload(secret, timestamp_text, body)
    # compare_digest on every candidate: the time taken does not reveal how much of one matched.
    if not any(hmac.compare_digest(expected, candidate.strip()) for candidate in signatures.split(",")):
        raise WebhookSignatureError("signature does not match the body")


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None:
        return value
    wanted = name.lower()
    return next((value for key, value in headers.items() if key.lower() == wanted), None)
