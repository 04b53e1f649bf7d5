"""Signed tokens for links that carry their own authority (approval e-mails, quality-report links).

A person opening a link from an e-mail or from the Dagster UI has no API key in their browser, so the
link itself must prove it was issued by the platform. `itsdangerous` signs a small JSON payload with
the platform's secret (HMAC-SHA256), optionally with an issue time for expiry; each purpose is its own
salt, so a token minted for one purpose is refused for any other.

Single use is the consumer's job (it knows what "used" means: an approval already decided). The
token only proves origin, purpose and age.

The secret: the env var named by `JUNCTION_SECRET_KEY_ENV` (default `JUNCTION_SECRET_KEY`) when set,
else a random key generated once into `$JUNCTION_HOME/secret.key` (mode 0600), shared by every process
of the embedded platform (gateway, code server, run workers).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from itsdangerous import BadSignature, SignatureExpired, URLSafeSerializer, URLSafeTimedSerializer

from orchestration.settings import JunctionSettings, get_settings


class InvalidLink(Exception):
    """The token is forged, altered, minted for another purpose, or expired."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def platform_secret(settings: JunctionSettings | None = None) -> str:
    """The signing key: from the environment, else the generated key file (created on first use)."""
    settings = settings or get_settings()
    from_env = os.environ.get(settings.secret_key_env)
    if from_env:
        return from_env
    return _key_file(settings.secret_key_file)


def _key_file(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(48)
    try:
        # O_EXCL: of two processes starting at once, one writes and both read the same key.
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _wait_for_key(path)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(key + "\n")
    return key


def _wait_for_key(path: Path) -> str:
    import time

    for _ in range(100):
        key = path.read_text().strip()
        if key:
            return key
        time.sleep(0.01)
    raise RuntimeError(f"{path} exists but stays empty: delete it to generate a new signing key")


def sign(purpose: str, payload: dict[str, Any], *, settings: JunctionSettings | None = None) -> str:
    """A URL-safe token for `payload`. Tokens verified with `max_age_s` carry their issue time."""
    return URLSafeTimedSerializer(platform_secret(settings), salt=purpose).dumps(payload)


def sign_permanent(purpose: str, payload: dict[str, Any], *, settings: JunctionSettings | None = None) -> str:
    """A token that never expires (a link stored in run metadata must keep working)."""
    return URLSafeSerializer(platform_secret(settings), salt=purpose).dumps(payload)


def verify(
    purpose: str, token: str, *, max_age_s: float | None = None, settings: JunctionSettings | None = None
) -> dict[str, Any]:
    """The payload of a token made by `sign` for `purpose`, younger than `max_age_s`; else InvalidLink."""
    serializer = URLSafeTimedSerializer(platform_secret(settings), salt=purpose)
    try:
        payload = serializer.loads(token, max_age=max_age_s)
    except SignatureExpired:
        raise InvalidLink("the link has expired") from None
    except BadSignature:
        raise InvalidLink("the link is not valid (altered, or not issued for this)") from None
    if not isinstance(payload, dict):
        raise InvalidLink("the link is not valid (altered, or not issued for this)")
    return payload


def verify_permanent(purpose: str, token: str, *, settings: JunctionSettings | None = None) -> dict[str, Any]:
    """The payload of a token made by `sign_permanent` for `purpose`; else InvalidLink."""
    try:
        payload = URLSafeSerializer(platform_secret(settings), salt=purpose).loads(token)
    except BadSignature:
        raise InvalidLink("the link is not valid (altered, or not issued for this)") from None
    if not isinstance(payload, dict):
        raise InvalidLink("the link is not valid (altered, or not issued for this)")
    return payload
