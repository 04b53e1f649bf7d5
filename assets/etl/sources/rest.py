"""The REST source: JSON records from an HTTP API, page by page, into Arrow batches.

Built on httpx (already the platform's HTTP client) rather than dlt's `RESTClient`: dlt would come
into every run worker with its own config, state and schema machinery for a few hundred lines of
paging and auth, which `paginators.py` and `auth.py` hold as one small class per kind.

A read renders the source's templates once (`incremental.*`, `platform.url`), then walks the pages
with the spec's paginator. Each request is retried on connection errors, 429 and 5xx with
exponential backoff and jitter (tenacity), waiting what `Retry-After` asks when the server sends it
(one parser for the platform: `resources.notifications.retry_after_seconds`), capped by
`retry.max_backoff`; any other 4xx fails the run naming the method, the URL (secrets masked) and the
status. A page whose body is not JSON is quarantined with its URL and page number (one record, so the
counts still add up) and paging goes on where the paginator can tell the next page without the body;
a record that is not an object is quarantined with its page and position.

Records: `data_selector` (JSONPath) picks them from each page; without it, the body itself when it is
a list, else the list of objects under a conventional key (data, items, results, ...) or the only list
of objects, chosen once and logged. Nested objects are flattened into columns joined by `separator`
(`customer.address.city` -> `customer__address__city`, as dlt names them) or kept as JSON text
(`nested: json`); lists are kept as JSON text. Types are inferred per batch by Arrow; a batch whose
values of one field mix kinds (a number here, text there) is read as text, to be typed by `cast`,
which quarantines what does not convert, rather than losing a value.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
import pyarrow as pa

from assets.etl.quarantine import Batch, Quarantine
from assets.etl.sources.auth import SourceAuth, open_auth
from assets.etl.sources.base import READ_STEP, InputIdentity, Source, clip_record
from assets.etl.sources.paginators import AutoPaginator, Page, find_first, open_paginator
from assets.etl.spec import RestRetrySpec, RestSourceSpec
from assets.etl.state import IncrementalWindow
from orchestration.errors import JunctionError
from orchestration.kernel.times import parse_duration

__all__ = ["RateLimit", "RestSource", "RetriesExhausted", "mask", "seconds", "send"]

RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})
# Where a page's records usually are when the body is an object.
RECORD_KEYS = ("data", "items", "results", "records", "entries", "rows", "objects", "values", "elements")


def mask(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


class RateLimit:
    """At most `per_second` requests per second, spaced evenly (a request waits for its slot).

    Ten lines, so not a library: the limit is per source and per run, in one process."""

    def __init__(self, per_second: float | None):
        self.interval = 1.0 / per_second if per_second else 0.0
        self.next_slot = 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            slot = max(self.next_slot, now)
            self.next_slot = slot + self.interval
        if slot > now:
            time.sleep(slot - now)


class _Retryable(Exception):
    def __init__(self, status: int, retry_after_s: float | None):
        super().__init__(f"answered {status}")
        self.status, self.retry_after_s = status, retry_after_s


def flatten(record: dict[str, Any], separator: str, nested: str) -> dict[str, Any]:
    """One level of columns: nested objects flattened (or JSON text), lists as JSON text."""
    flat: dict[str, Any] = {}

    def put(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            if nested == "json" and prefix:
                flat[prefix] = orjson.dumps(value).decode()
                return
            if not value and prefix:
                flat[prefix] = None
            for key, inner in value.items():
                put(f"{prefix}{separator}{key}" if prefix else str(key), inner)
        elif isinstance(value, list):
            flat[prefix] = orjson.dumps(value).decode()
        else:
            flat[prefix] = value

    put("", record)
    return flat


class RestSource(Source):
    """Records of one API resource (a `kind: rest` source)."""

    def __init__(self, spec: RestSourceSpec, batch_size: int, window: IncrementalWindow | None = None):
        self.spec = spec
        self.batch_size = batch_size
        self.window = window
        self.read_at = datetime.now(UTC)
        self._notes: list[str] = []
        self.requests_made = 0
        self.pages_read = 0
        # A stream-triggered run's events (`trigger.*` in templates: stream, ids, count, keys,
        # events), set by the staged asset; None otherwise.
        self.trigger: dict[str, Any] | None = None

    @property
    def description(self) -> str:
        return f"{self.spec.method} {self.spec.base_url.rstrip('/')}/{self.spec.path.lstrip('/')}".rstrip("/")

    def notes(self) -> list[str]:
        return list(self._notes)

    def identity(self) -> InputIdentity:
        # An API has no stable identity to read back: every read is a new input (its moment is part
        # of it), and a re-read of the same records is made idempotent by merge, not by the load id.
        params = orjson.dumps(self.spec.params, option=orjson.OPT_SORT_KEYS).decode()
        start = "" if self.window is None else str(self.window.template_values()["start"])
        return InputIdentity("rest", ((self.description, params, start, self.read_at.isoformat()),))

    def _context(self) -> dict[str, Any]:
        from orchestration.settings import get_settings

        return {
            "incremental": self.window.template_values() if self.window is not None else None,
            "platform": {"url": get_settings().public_url.rstrip("/")},
            "trigger": self.trigger,
        }

    @property
    def narrowed(self) -> bool:
        """Whether this read is narrowed to a triggered run's events (its templates use `trigger`)."""
        return self.trigger is not None and self.uses_trigger

    @property
    def uses_trigger(self) -> bool:
        """Whether the source's templates read `trigger` (only then does a triggered run read its events)."""
        from orchestration.kernel.templates import referenced_variables

        texts = [self.spec.base_url, self.spec.path, *self.spec.headers.values()]
        texts += [value for value in self.spec.params.values() if isinstance(value, str)]
        return any(
            path == "trigger" or path.startswith("trigger.")
            for text in texts
            for path in referenced_variables(text)
        )

    def _rendered(self) -> tuple[str, dict[str, Any], dict[str, str]]:
        from orchestration.kernel.templates import TemplateRenderError, render, render_data

        # `trigger` stays defined as None outside triggered runs, so `if trigger` works in a template.
        context = {
            name: value for name, value in self._context().items() if value is not None or name == "trigger"
        }
        try:
            base = render(self.spec.base_url, context)
            path = render(self.spec.path, context)
            params = render_data(self.spec.params, context)
            headers = render_data(self.spec.headers, context)
        except TemplateRenderError as exc:
            raise JunctionError(f"source: {exc}") from None
        url = f"{base.rstrip('/')}/{path.lstrip('/')}" if path else base
        if not url.startswith(("http://", "https://")):
            raise JunctionError(f"source.base_url must render to an http:// or https:// URL, got {url!r}")
        return url, {k: v for k, v in params.items() if v != "" and v is not None}, headers

    def read(self, quarantine: Quarantine) -> Iterator[Batch]:
        import httpx

        url, params, headers = self._rendered()
        auth = open_auth(self.spec.auth)
        secrets = auth.secrets if auth is not None else ()
        paginator = open_paginator(self.spec.paginator)
        limit = RateLimit(self.spec.rate_limit)
        timeout = seconds(self.spec.timeout)
        params = paginator.first(params)
        selector = self.spec.data_selector
        rows: list[dict[str, Any]] = []
        first_row = 1
        number = 0
        with httpx.Client(auth=auth, timeout=timeout, headers=headers, follow_redirects=True) as client:
            while True:
                number += 1
                limit.wait()
                response = self._request(client, url, params, auth, number)
                self.pages_read += 1
                body, problem = _json_body(response)
                records: list[Any] = []
                if problem is not None:
                    shown = mask(str(response.url), auth.secrets if auth is not None else secrets)
                    quarantine.add(
                        f"{shown} (page {number})",
                        READ_STEP,
                        f"page {number} is not JSON: {problem}",
                        row=number,
                        record=clip_record(response.text),
                    )
                else:
                    if selector is None:
                        selector = self._detect_selector(body)
                    records = _select(body, selector)
                    if records is None:
                        keys = ", ".join(body) if isinstance(body, dict) else type(body).__name__
                        raise JunctionError(
                            f"{self.description}: source.data_selector {selector!r} matches nothing in "
                            f"page {number} (the page holds: {keys or 'nothing'})"
                        )
                    for position, record in enumerate(records, start=1):
                        if isinstance(record, dict):
                            rows.append(flatten(record, self.spec.separator, self.spec.nested))
                        else:
                            quarantine.add(
                                f"{self.description} (page {number})",
                                READ_STEP,
                                f"record {position} of page {number} is not an object",
                                record=clip_record(orjson.dumps(record).decode()),
                            )
                if len(rows) >= self.batch_size:
                    yield self._batch(rows, first_row, number)
                    first_row += len(rows)
                    rows = []
                following = paginator.next_request(url, params, Page(number, response, body, records))
                if isinstance(paginator, AutoPaginator) and number == 1:
                    self._notes.append(f"{self.description}: paginator detected: {paginator.chosen}")
                if following is None:
                    break
                if self.spec.max_pages is not None and number >= self.spec.max_pages:
                    self._notes.append(f"{self.description}: stopped after max_pages={self.spec.max_pages}")
                    break
                url, params = following
        if rows:
            yield self._batch(rows, first_row, number)

    def probe(self) -> list[dict[str, Any]]:
        """The records of the first page alone, flattened (one request, no quarantine): what a poll
        trigger looks at to tell whether a run would find anything past the cursor."""
        import httpx

        url, params, headers = self._rendered()
        auth = open_auth(self.spec.auth)
        timeout = seconds(self.spec.timeout)
        params = open_paginator(self.spec.paginator).first(params)
        with httpx.Client(auth=auth, timeout=timeout, headers=headers, follow_redirects=True) as client:
            response = self._request(client, url, params, auth, 1)
        body, problem = _json_body(response)
        if problem is not None:
            raise JunctionError(f"{self.description}: the first page is not JSON: {problem}")
        selector = self.spec.data_selector or self._detect_selector(body)
        records = _select(body, selector) or []
        return [
            flatten(record, self.spec.separator, self.spec.nested)
            for record in records
            if isinstance(record, dict)
        ]

    def _detect_selector(self, body: Any) -> str:
        if isinstance(body, list):
            chosen = "$"
        elif isinstance(body, dict):
            lists = [key for key, value in body.items() if isinstance(value, list)]
            of_objects = [key for key in lists if not body[key] or isinstance(body[key][0], dict)]
            named = [key for key in RECORD_KEYS if key in of_objects]
            if named:
                chosen = named[0]
            elif len(of_objects) == 1:
                chosen = of_objects[0]
            elif not lists:
                chosen = "$"  # one object: one record
                self._notes.append(f"{self.description}: the answer holds no list; each page is one record")
            else:
                raise JunctionError(
                    f"{self.description}: the answer holds several lists ({', '.join(lists)}); "
                    "set source.data_selector to the records' JSONPath"
                )
        else:
            raise JunctionError(f"{self.description}: the answer is neither a list nor an object")
        self._notes.append(f"{self.description}: records at {chosen} (data_selector detected)")
        return chosen

    def _batch(self, rows: list[dict[str, Any]], first_row: int, page: int) -> Batch:
        try:
            table = pa.Table.from_pylist(rows)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            names = list(dict.fromkeys(name for row in rows for name in row))
            table = pa.table(
                {name: pa.array([_as_text(row.get(name)) for row in rows], pa.string()) for name in names}
            )
            self._notes.append(
                f"{self.description}: values of one field mix kinds by page {page}; that batch is read as "
                "text (cast the fields in the spec)"
            )
        return Batch.from_table(table, self.description, first_row=first_row)

    def _request(
        self, client: Any, url: str, params: dict[str, Any], auth: SourceAuth | None, number: int
    ) -> Any:
        import httpx

        secrets = auth.secrets if auth is not None else ()

        def counted() -> None:
            self.requests_made += 1

        try:
            # params=None, not {}: httpx replaces the query of a next-page URL with an empty mapping.
            response = send(
                client, self.spec.method, url, self.spec.retry, params=params or None, on_attempt=counted
            )
        except RetriesExhausted as exc:
            shown = mask(str(httpx.URL(url, params=params or None)), secrets)
            if exc.status is not None:
                raise JunctionError(
                    f"{self.spec.method} {shown} (page {number}) answered {exc.status} after "
                    f"{exc.attempts} attempts"
                ) from None
            raise JunctionError(
                f"{self.spec.method} {shown} (page {number}) failed after {exc.attempts} attempts: "
                f"{mask(exc.detail, secrets)}"
            ) from None
        if not response.is_success:
            shown = mask(str(response.url), secrets)
            raise JunctionError(
                f"{self.spec.method} {shown} (page {number}) answered {response.status_code}: "
                f"{mask(response.text[:300], secrets)}"
            )
        return response


def seconds(duration: str) -> float:
    """A spec's duration (checked at load) in seconds: timeouts and backoffs."""
    parsed = parse_duration(duration)
    assert parsed is not None  # DurationText refused anything else at load
    return parsed.total_seconds()


class RetriesExhausted(Exception):
    """Every attempt failed: the last retried status (429, 5xx), or None after connection errors."""

    def __init__(self, status: int | None, detail: str, attempts: int):
        super().__init__(detail)
        self.status, self.detail, self.attempts = status, detail, attempts


def send(
    client: Any,
    method: str,
    url: str,
    policy: RestRetrySpec,
    *,
    on_attempt: Any = None,
    **request: Any,
) -> Any:
    """One HTTP request with the platform's retry habits, for the REST source and the REST target:
    exponential backoff with jitter on connection errors, 429 and 5xx, waiting what `Retry-After`
    asks (capped by `max_backoff`). Returns the first answer that is not retried, whatever its status;
    raises `RetriesExhausted` when the attempts run out. `request`: httpx's (params, json, headers...)."""
    import httpx
    import tenacity

    from resources.notifications import retry_after_seconds

    initial, ceiling = seconds(policy.initial_backoff), seconds(policy.max_backoff)

    def wait(state: tenacity.RetryCallState) -> float:
        failure = state.outcome.exception() if state.outcome else None
        asked = getattr(failure, "retry_after_s", None)
        if asked is not None:
            return min(asked, ceiling)
        backoff = initial * 2 ** (state.attempt_number - 1)
        return min(backoff * (0.5 + random.random() / 2), ceiling)  # jitter: half to all of it

    def attempt() -> Any:
        if on_attempt is not None:
            on_attempt()
        response = client.request(method, url, **request)
        if response.status_code in RETRIED_STATUSES:
            raise _Retryable(response.status_code, retry_after_seconds(response.headers.get("Retry-After")))
        return response

    try:
        return tenacity.Retrying(
            stop=tenacity.stop_after_attempt(policy.max_attempts),
            wait=wait,
            retry=tenacity.retry_if_exception_type((_Retryable, httpx.TransportError)),
            reraise=True,
        )(attempt)
    except _Retryable as exc:
        raise RetriesExhausted(exc.status, f"answered {exc.status}", policy.max_attempts) from None
    except httpx.HTTPError as exc:
        raise RetriesExhausted(None, f"{type(exc).__name__}: {exc}", policy.max_attempts) from None


def _json_body(response: Any) -> tuple[Any, str | None]:
    try:
        return orjson.loads(response.content), None
    except orjson.JSONDecodeError as exc:
        return None, str(exc)


def _select(body: Any, selector: str) -> list[Any] | None:
    """The records `selector` picks from a page: [] when it holds null, None when it matches nothing."""
    if selector == "$":
        return body if isinstance(body, list) else [body]
    if isinstance(body, dict) and selector in body:
        found = body[selector]
    else:
        found = find_first(body, selector)
        if found is None:
            return None
    if found is None:
        return []
    return found if isinstance(found, list) else [found]


def _as_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return orjson.dumps(value).decode()
