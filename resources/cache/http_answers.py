"""HTTP answers kept in a cache namespace and revalidated with their validators (RFC 9111), for the
REST source's GETs (and any caller with an httpx client).

- A fresh answer is reused without a request.
- A stale one (past its ttl, kept for the namespace's `stale_grace`) is asked for again with
  `If-None-Match` (its `ETag`) and `If-Modified-Since` (its `Last-Modified`): a `304 Not Modified`
  renews it for another ttl without a body; any other answer replaces it.
- `Cache-Control: no-store` is never kept; `no-cache` is kept but revalidated on every use; `max-age`
  is the ttl when the caller gives none (else the namespace's ttl).

Only successful answers are kept, with their body as received (decoded, so the content-encoding and
length headers are dropped) and without `Set-Cookie` or hop-by-hop headers. The key hashes the method,
URL, query, headers and the caller's credentials: another credential never reads an answer, and no
credential is stored.
"""

from __future__ import annotations

import base64
import hashlib
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from orchestration.kernel.times import DurationText, duration_seconds

# Not kept with an answer: hop-by-hop headers, cookies, and what no longer describes the decoded body.
_DROPPED_HEADERS = frozenset(
    {
        "connection",
        "content-encoding",
        "content-length",
        "keep-alive",
        "set-cookie",
        "transfer-encoding",
        "date",
    }
)

How = Literal["cached", "revalidated", "fetched"]


class AnswerCacheSpec(BaseModel):
    """Successful GET answers kept in a cache namespace (caches.yaml)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    namespace: str = Field(pattern=r"^[a-z][a-z0-9_]*$", description="A namespace of caches.yaml")
    ttl: DurationText | None = Field(
        default=None,
        description="How long an answer is used without asking (default: its max-age, else the "
        "namespace's ttl); past it, an answer with an ETag or Last-Modified is revalidated for the "
        "namespace's stale_grace",
    )

    @property
    def ttl_s(self) -> float | None:
        return duration_seconds(self.ttl) if self.ttl else None


def answer_key(
    method: str,
    url: str,
    params: Mapping[str, Any] | None,
    headers: Mapping[str, str] | None,
    credentials: Iterable[str] = (),
) -> str:
    identity = {
        "method": method.upper(),
        "url": url,
        "params": dict(params or {}),
        "headers": {name.lower(): value for name, value in (headers or {}).items()},
        # Whose answer it is: another credential must not read it. Hashed with the rest, never stored.
        "credentials": list(credentials),
    }
    return (
        "http:" + hashlib.sha256(orjson.dumps(identity, option=orjson.OPT_SORT_KEYS, default=str)).hexdigest()
    )


@dataclass
class AnswerCacheFigures:
    cached: int = 0  # answered from the cache, no request
    revalidated: int = 0  # asked with validators, answered 304
    fetched: int = 0  # asked, answered with a body


class AnswerCache:
    """One namespace's HTTP answers (`fetch` is the one way in)."""

    def __init__(self, cache: Any, ttl_s: float | None = None):
        self.cache = cache
        self.ttl_s = ttl_s
        self.figures = AnswerCacheFigures()
        self._lock = threading.Lock()  # pages fetched at once count into one set of figures

    def _count(self, how: How) -> None:
        with self._lock:
            setattr(self.figures, how, getattr(self.figures, how) + 1)

    def fetch(self, key: str, send: Callable[[dict[str, str]], Any]) -> tuple[Any, How]:
        """(an httpx.Response, how it was answered). `send(validators)` makes the request with the
        extra headers given (none, or the conditional ones) and returns its httpx.Response."""
        cached, validators = self.consult(key)
        if cached is not None and not validators and cached.fresh:
            return _response(cached.value), "cached"
        response = send(validators)
        if response.status_code == 304 and cached is not None and validators:
            return _response(self.renew(key, cached, response.headers), response), "revalidated"
        self.keep(key, response.status_code, response.headers, lambda: _stored(response))
        return response, "fetched"

    # The steps of `fetch`, for callers that make the request themselves (the reverse proxy, async).

    def consult(self, key: str) -> tuple[Any, dict[str, str]]:
        """(the kept entry or None, the validators to ask with). A fresh entry comes with no
        validators and is counted as answered from the cache: use it as it is."""
        cached = self.cache.lookup(key)
        if cached is not None and cached.fresh:
            self._count("cached")
            return cached, {}
        validators: dict[str, str] = {}
        if cached is not None:
            if cached.value.get("etag"):
                validators["If-None-Match"] = cached.value["etag"]
            if cached.value.get("last_modified"):
                validators["If-Modified-Since"] = cached.value["last_modified"]
        return cached, validators

    def renew(self, key: str, cached: Any, headers: Mapping[str, str]) -> dict[str, Any]:
        """A 304 to the validators: the kept answer, for another ttl."""
        self.cache.set(key, cached.value, ttl=self._ttl(headers, cached.value))
        self._count("revalidated")
        return cached.value

    def keep(
        self, key: str, status: int, headers: Mapping[str, str], stored: Callable[[], dict[str, Any]]
    ) -> bool:
        """An answer with a body: kept when successful and not `no-store` (`stored()` builds the
        entry, see `stored_answer`); whether it was."""
        self._count("fetched")
        if not 200 <= status < 300 or "no-store" in _directives(headers):
            return False
        entry = stored()
        self.cache.set(key, entry, ttl=self._ttl(headers, entry))
        return True

    def _ttl(self, headers: Mapping[str, str], stored: dict[str, Any]) -> float | None:
        directives = _directives(headers)
        if "no-cache" in directives:
            return 0.0
        if self.ttl_s is not None:
            return self.ttl_s
        max_age = directives.get("max-age")
        if max_age is not None and max_age.isdigit():
            return float(max_age)
        return None  # the namespace's


def _directives(headers: Mapping[str, str]) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for part in headers.get("cache-control", "").split(","):
        name, _, value = part.strip().partition("=")
        if name:
            found[name.lower()] = value.strip('"') or None
    return found


def _stored(response: Any) -> dict[str, Any]:
    return stored_answer(response.status_code, str(response.url), response.headers.items(), response.content)


def stored_answer(
    status: int, url: str, headers: Iterable[tuple[str, str]], content: bytes
) -> dict[str, Any]:
    """The entry kept for an answer (`content` decoded: no content-encoding)."""
    headers = [[name, value] for name, value in headers if name.lower() not in _DROPPED_HEADERS]
    found = {name.lower(): value for name, value in headers}
    try:
        body, encoding = content.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        body, encoding = base64.b64encode(content).decode(), "base64"
    return {
        "status": status,
        "url": url,
        "headers": headers,
        "body": body,
        "encoding": encoding,
        "etag": found.get("etag"),
        "last_modified": found.get("last-modified"),
    }


def stored_content(stored: dict[str, Any]) -> bytes:
    return stored["body"].encode() if stored["encoding"] == "utf-8" else base64.b64decode(stored["body"])


def _response(stored: dict[str, Any], revalidation: Any = None) -> Any:
    """The kept answer as an httpx.Response (for the request that revalidated it, if any)."""
    import httpx

    content = stored_content(stored)
    request = revalidation.request if revalidation is not None else httpx.Request("GET", stored["url"])
    return httpx.Response(stored["status"], headers=stored["headers"], content=content, request=request)
