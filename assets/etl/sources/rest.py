"""The REST source: JSON records from an HTTP API, page by page, into Arrow batches.

Built on httpx (already the platform's HTTP client) rather than dlt's `RESTClient`: dlt would come
into every run worker with its own config, state and schema machinery for a few hundred lines of
paging and auth, which `paginators.py` and `auth.py` hold as one small class per kind.

A read renders the source's templates once (`incremental.*`, `run.*`, `platform.url`, `trigger.*`), then walks the pages
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

import dataclasses
import itertools
import random
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import orjson
import pyarrow as pa

from assets.etl.quarantine import Batch, Quarantine, RowCounts
from assets.etl.sources.auth import SourceAuth, open_auth
from assets.etl.sources.base import READ_STEP, InputIdentity, Source, clip_record, records_table
from assets.etl.sources.paginators import AutoPaginator, Page, find_first, open_paginator
from assets.etl.spec import LoadedPipeline, RestRetrySpec, RestSourceSpec
from assets.etl.state import IncrementalStep, IncrementalWindow, RunWindow
from orchestration.errors import JunctionError
from orchestration.kernel.times import duration_seconds

__all__ = ["RateLimit", "RestSource", "RetriesExhausted", "mask", "secrets_of", "send"]

RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})
# Where a page's records usually are when the body is an object.
RECORD_KEYS = ("data", "items", "results", "records", "entries", "rows", "objects", "values", "elements")


def secrets_of(auth: SourceAuth | None) -> tuple[str, ...]:
    """The values to mask wherever a URL or error is shown (none without auth)."""
    return auth.secrets if auth is not None else ()


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

    def __init__(
        self,
        spec: RestSourceSpec,
        batch_size: int,
        window: IncrementalWindow | None = None,
        upstream: Mapping[str, LoadedPipeline] | None = None,
    ):
        self.spec = spec
        self.batch_size = batch_size
        self.window = window
        self.read_at = datetime.now(UTC)
        self.upstream = upstream
        self._notes: list[str] = []
        self._selector = spec.data_selector
        self._lock = threading.Lock()  # children of several parents are read at once
        self.requests_made = 0
        self.pages_read = 0
        # GET answers kept in the spec's cache namespace (`source.cache`), opened on the first request.
        self._answers: Any = None
        self.children_read = 0
        self.parents_skipped = 0
        # A stream-triggered run's events (`trigger.*` in templates: stream, ids, count, keys,
        # events), set by the staged asset; None otherwise.
        self.trigger: dict[str, Any] | None = None
        # The span of time the run stands for (`run.*`: id, start, end), set by the staged asset.
        self.run: RunWindow | None = None

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
            "run": self.run.template_values() if self.run is not None else None,
        }

    @property
    def narrowed(self) -> bool:
        """Whether this read is narrowed to a triggered run's events (its templates use `trigger`)."""
        return self.trigger is not None and self.uses_trigger

    @property
    def uses_trigger(self) -> bool:
        """Whether the source's templates read `trigger` (only then does a triggered run read its events)."""
        from orchestration.kernel.templates import referenced_variables

        return any(
            path == "trigger" or path.startswith("trigger.")
            for text in self.spec.template_texts()
            for path in referenced_variables(text)
        )

    def _rendered(self, parent: dict[str, Any] | None = None) -> tuple[str, dict[str, Any], dict[str, str]]:
        """(url, params, headers) rendered; `parent`: the parent record a child resource is read for."""
        from orchestration.kernel.templates import TemplateRenderError, render, render_data

        # `trigger` stays defined as None outside triggered runs, so `if trigger` works in a template.
        context = {
            name: value for name, value in self._context().items() if value is not None or name == "trigger"
        }
        if parent is not None:
            context["parent"] = parent
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

        auth = open_auth(self.spec.auth)
        limit = RateLimit(self.spec.rate_limit)
        pool = httpx.Limits(
            max_connections=self.spec.max_concurrency, max_keepalive_connections=self.spec.max_concurrency
        )
        rows: list[dict[str, Any]] = []
        first_row, pages = 1, 0
        with httpx.Client(
            auth=auth, timeout=duration_seconds(self.spec.timeout), limits=pool, follow_redirects=True
        ) as client:
            for page_rows, problems in self._resources(client, auth, limit):
                pages += 1
                for problem in problems:
                    quarantine.add(**problem)
                rows.extend(page_rows)
                if len(rows) >= self.batch_size:
                    yield self._batch(rows, first_row, pages)
                    first_row += len(rows)
                    rows = []
        if rows:
            yield self._batch(rows, first_row, pages)

    def _resources(
        self, client: Any, auth: SourceAuth | None, limit: RateLimit
    ) -> Iterator[tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
        """(rows, quarantine entries) page by page: of the one resource, or of each parent's child
        resource (up to `max_concurrency` children in flight, their pages yielded in parent order)."""
        if self.spec.parent is None:
            yield from self._walk(client, auth, limit, *self._rendered())
            return
        carry = self.spec.parent.carry

        def read_child(parent: dict[str, Any]) -> list[tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
            pages = list(self._walk(client, auth, limit, *self._rendered(parent)))
            carried = {column: parent.get(field) for column, field in carry.items()}
            for rows, _ in pages:
                for row in rows:
                    row.update(carried)  # the parent's key wins over a child field of the same name
            return pages

        with ThreadPoolExecutor(self.spec.max_concurrency, thread_name_prefix="rest-child") as pool:
            # A bounded window of parents at a time: the children of 100,000 parents are not all held.
            parents = self._parents()
            while chunk := list(itertools.islice(parents, self.spec.max_concurrency * 4)):
                for pages in pool.map(read_child, chunk):
                    self.children_read += 1
                    yield from pages
        self._note(
            f"{self.description}: {self.children_read:,} child resource(s) read, one per record of "
            f"{self.spec.parent.pipeline or self.spec.parent.asset} in the window ({self.parents_skipped:,} outside it)"
        )

    def _parents(self) -> Iterator[dict[str, Any]]:
        """The parent pipeline's published records; with an incremental cursor that is a carried
        column, only those whose carried field is in the window (the others have no new children)."""
        from assets.etl.sources.tables import AssetSource, published_pipeline

        parent = self.spec.parent
        assert parent is not None
        records = AssetSource(published_pipeline(parent, self.upstream), self.batch_size)
        step = None
        if self.window is not None and self.window.spec.cursor in parent.carry:
            field = parent.carry[self.window.spec.cursor]
            step = IncrementalStep(
                dataclasses.replace(self.window, spec=self.window.spec.model_copy(update={"cursor": field}))
            )
        unused = Quarantine()  # a published table's rows parse; a parent without a cursor value is skipped
        for batch in records.read(unused):
            if step is not None:
                kept = step.apply(batch, unused, RowCounts())
                self.parents_skipped += batch.num_rows - kept.num_rows
                batch = kept
            yield from batch.table.to_pylist()

    def _walk(
        self,
        client: Any,
        auth: SourceAuth | None,
        limit: RateLimit,
        url: str,
        params: dict[str, Any],
        headers: dict[str, str],
    ) -> Iterator[tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
        """One resource's pages with the spec's paginator: each page's flattened records and the
        quarantine entries of what could not be read (a page not JSON, a record not an object)."""
        paginator = open_paginator(self.spec.paginator)
        params = paginator.first(params)
        secrets = secrets_of(auth)
        number = 0
        while True:
            number += 1
            response = self._request(client, url, params, headers, auth, number, limit)
            body, records, rows, problems = self._page(response, number, secrets)
            yield rows, problems
            page = Page(number, response, body, records)
            if number == 1 and self.spec.parent is None and self.spec.max_concurrency > 1:
                later = paginator.later_requests(url, params, page)
                if later is not None:  # the first page said how many: ask for the rest at once
                    if self.spec.max_pages is not None and len(later) >= self.spec.max_pages:
                        later = later[: self.spec.max_pages - 1]
                        self._note(f"{self.description}: stopped after max_pages={self.spec.max_pages}")
                    yield from self._pages_at_once(client, auth, limit, headers, later)
                    return
            following = paginator.next_request(url, params, page)
            if isinstance(paginator, AutoPaginator) and number == 1:
                self._note(f"{self.description}: paginator detected: {paginator.chosen}")
            if following is None:
                return
            if self.spec.max_pages is not None and number >= self.spec.max_pages:
                self._note(f"{self.description}: stopped after max_pages={self.spec.max_pages}")
                return
            url, params = following

    def _pages_at_once(
        self,
        client: Any,
        auth: SourceAuth | None,
        limit: RateLimit,
        headers: dict[str, str],
        requests: list[tuple[str, dict[str, Any]]],
    ) -> Iterator[tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
        """Pages 2.. of a resource whose first page told their number: up to `max_concurrency` in
        flight, yielded in page order."""
        secrets = secrets_of(auth)

        def fetch(
            numbered: tuple[int, tuple[str, dict[str, Any]]],
        ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
            number, (url, params) = numbered
            response = self._request(client, url, params, headers, auth, number, limit)
            _, _, rows, problems = self._page(response, number, secrets)
            return rows, problems

        with ThreadPoolExecutor(self.spec.max_concurrency, thread_name_prefix="rest-page") as pool:
            numbered = enumerate(requests, start=2)
            while chunk := list(itertools.islice(numbered, self.spec.max_concurrency * 4)):
                yield from pool.map(fetch, chunk)

    def _page(
        self, response: Any, number: int, secrets: tuple[str, ...]
    ) -> tuple[Any, list[Any], list[dict[str, Any]], list[dict[str, Any]]]:
        """(body, records, flattened rows, quarantine entries) of one answer: a page that is not JSON
        and records that are not objects are quarantined, the rest flattened."""
        with self._lock:
            self.pages_read += 1
        body, problem = _json_body(response)
        records: list[Any] = []
        rows: list[dict[str, Any]] = []
        problems: list[dict[str, Any]] = []
        if problem is not None:
            problems.append(
                {
                    "source": f"{mask(str(response.url), secrets)} (page {number})",
                    "step": READ_STEP,
                    "reason": f"page {number} is not JSON: {problem}",
                    "row": number,
                    "record": clip_record(response.text),
                }
            )
            return None, records, rows, problems
        selected = _select(body, self._selector_for(body))
        if selected is None:
            keys = ", ".join(body) if isinstance(body, dict) else type(body).__name__
            raise JunctionError(
                f"{self.description}: source.data_selector {self._selector!r} matches nothing in "
                f"page {number} of {mask(str(response.url), secrets)} (the page holds: {keys or 'nothing'})"
            )
        for position, record in enumerate(selected, start=1):
            if isinstance(record, dict):
                rows.append(flatten(record, self.spec.separator, self.spec.nested))
            else:
                problems.append(
                    {
                        "source": f"{self.description} (page {number})",
                        "step": READ_STEP,
                        "reason": f"record {position} of page {number} is not an object",
                        "record": clip_record(orjson.dumps(record).decode()),
                    }
                )
        return body, selected, rows, problems

    def _selector_for(self, body: Any) -> str:
        """The records' JSONPath: the spec's, else detected from the first page read (and kept)."""
        with self._lock:
            if self._selector is None:
                self._selector = self._detect_selector(body)
            return self._selector

    def _note(self, text: str) -> None:
        with self._lock:
            if text not in self._notes:  # children of many parents decide the same thing once each
                self._notes.append(text)

    def probe(self) -> list[dict[str, Any]]:
        """The records of the first page alone, flattened (one request, no quarantine): what a poll
        trigger looks at to tell whether a run would find anything past the cursor."""
        import httpx

        if self.spec.parent is not None:
            raise JunctionError(
                f"{self.description}: a child resource (source.parent) has no first page to probe"
            )
        url, params, headers = self._rendered()
        auth = open_auth(self.spec.auth)
        timeout = duration_seconds(self.spec.timeout)
        params = open_paginator(self.spec.paginator).first(params)
        with httpx.Client(auth=auth, timeout=timeout, follow_redirects=True) as client:
            response = self._request(client, url, params, headers, auth, 1)
        body, problem = _json_body(response)
        if problem is not None:
            raise JunctionError(f"{self.description}: the first page is not JSON: {problem}")
        records = _select(body, self._selector_for(body)) or []
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
            table = records_table(rows)
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
        self,
        client: Any,
        url: str,
        params: dict[str, Any],
        headers: dict[str, str],
        auth: SourceAuth | None,
        number: int,
        limit: RateLimit | None = None,
    ) -> Any:
        """One page's answer (retried; from the answer cache when `source.cache` says so); an answer
        that is not a success fails the read naming the URL, masked."""
        import httpx

        secrets = secrets_of(auth)

        def counted() -> None:
            with self._lock:
                self.requests_made += 1

        def sent(validators: dict[str, str]) -> Any:
            if limit is not None:
                limit.wait()
            try:
                # params=None, not {}: httpx replaces the query of a next-page URL with an empty mapping.
                return send(
                    client,
                    self.spec.method,
                    url,
                    self.spec.retry,
                    params=params or None,
                    headers={**headers, **validators} or None,
                    on_attempt=counted,
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

        answers = self._answer_cache()
        if answers is None:
            response = sent({})
        else:
            from resources.cache.http_answers import answer_key

            credentials = auth.credentials if auth is not None else ()
            response, _ = answers.fetch(answer_key(self.spec.method, url, params, headers, credentials), sent)
        if not response.is_success:
            shown = mask(str(response.url), secrets)
            raise JunctionError(
                f"{self.spec.method} {shown} (page {number}) answered {response.status_code}: "
                f"{mask(response.text[:300], secrets)}"
            )
        return response

    def _answer_cache(self) -> Any:
        """The `AnswerCache` of `source.cache` (None without one), opened once per read."""
        if self.spec.cache is None:
            return None
        with self._lock:
            if self._answers is None:
                from resources.cache import open_cache
                from resources.cache.http_answers import AnswerCache

                try:
                    cache = open_cache(self.spec.cache.namespace)
                except KeyError as exc:
                    raise JunctionError(f"source.cache.namespace: {exc.args[0]}") from None
                self._answers = AnswerCache(cache, self.spec.cache.ttl_s)
            return self._answers

    @property
    def answers(self) -> dict[str, int] | None:
        """Pages answered from the cache without a request (`cached`), by a 304 (`revalidated`) or
        with a body (`fetched`); None without `source.cache`."""
        if self._answers is None:
            return None
        return dict(self._answers.figures.__dict__)


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

    initial, ceiling = duration_seconds(policy.initial_backoff), duration_seconds(policy.max_backoff)

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
