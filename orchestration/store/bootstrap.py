"""Bring the platform store to the code's revision, with a clear error when it cannot be reached."""

from __future__ import annotations

from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from orchestration.errors import ConfigurationError
from orchestration.store.migrate import current_revision, upgrade


def redacted(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def migrate_store(url: str | None = None, revision: str = "head") -> str:
    """Upgrade the store to `revision` (automatic on start; `junction db upgrade` by hand)."""
    from orchestration.settings import get_settings

    url = url or get_settings().store_url
    try:
        upgrade(url, revision)
        return current_revision(url) or "base"
    except OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise ConfigurationError(f"platform store {redacted(url)} is unreachable: {reason}") from None
