"""The reverse proxy: an ASGI app mounted at `/gateway/proxy` (embedded and in `junction gateway`).

Per request, in a fixed order (Kong's phases): match a route → authenticate and authorize →
choose a target (the upstream's balancer, skipping targets whose breaker refuses) → forward →
stream the answer back. A connection error, a timeout or a 5xx answer counts against the target's
breaker; for an idempotent method the request is tried again on another target, up to the
upstream's `retries`. Every refusal is problem+json: 404 (no route), 401/403, 503 with Retry-After
(no target can take it), 502 (no target answered), 504 (a target too slow).

The routes file and the routes and upstreams of the admin API (`declarations.py`) are read again when
either changes (`watch`, every `RELOAD_CHECK_S`, off the request path) and swapped in whole; a
configuration that does not validate leaves the running one in place (logged, and shown in `status()`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

from orchestration.gateway.metrics import ANONYMOUS, UNMATCHED_ROUTE
from orchestration.gateway.proxy.balancers import RequestFacts, Target
from orchestration.gateway.proxy.config import RoutesFile, load_routes_file
from orchestration.gateway.proxy.declarations import ApiDeclarations, merge
from orchestration.gateway.proxy.health import ActiveChecks, count_answer
from orchestration.gateway.proxy.limiters import ratelimit_headers
from orchestration.gateway.proxy.openapi import DOCUMENT_REFRESH_S, merged_document
from orchestration.gateway.proxy.routing import (
    ProxyConfig,
    RouteMatch,
    Upstream,
    compile_config,
    transition_logger,
)
from orchestration.gateway.proxy.transforms import RouteTransform, TransformFailed
from orchestration.gateway.security import looks_like_jwt
from orchestration.kernel.spec_errors import SpecError

logger = logging.getLogger("junction.gateway.proxy")
PROXY_PREFIX = "/proxy"  # under the gateway's own prefix: /gateway/proxy/...
RELOAD_CHECK_S = 2.0
DOCUMENT_TIMEOUT_S = 5.0  # fetching an upstream's OpenAPI document
WHOLE_BODY_BYTES = 64 * 1024  # answers up to this size (with a Content-Length) are relayed in one piece
LATENCY_SAMPLES = 4096  # the newest latencies per route, for the percentiles
# An authenticated key is trusted this long before the store is asked again (a revoked key keeps
# working at most this long through the proxy; the platform API asks every time).
AUTH_CACHE_S = 30.0
# Headers aiohttp would add by itself: a proxied request carries the client's, or none.
SKIPPED_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
CACHED_METHODS = frozenset({"GET", "HEAD"})
CONDITIONAL = frozenset({"if-none-match", "if-modified-since", "if-match", "if-unmodified-since", "range"})
CACHED_BODY_BYTES = 1024 * 1024  # answers up to this size (and of known size) are kept by a route's cache
CACHE_HIT = (b"x-cache-status", b"HIT")
CACHE_MISS = (b"x-cache-status", b"MISS")
CACHE_REVALIDATED = (b"x-cache-status", b"REVALIDATED")
CACHE_BYPASS = (b"x-cache-status", b"BYPASS")
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# Not forwarded upstream: the hop-by-hop headers, the Host (the target's own is sent) and the
# gateway credentials (a Junction key means nothing to an upstream and must not leak to it).
NOT_FORWARDED = HOP_BY_HOP | {"host", "content-length", "authorization", "x-api-key"}
# Not relayed from an answer: the hop-by-hop headers, and the Date and Server the gateway's own server
# writes (relayed too, a client saw each twice).
NOT_RELAYED = frozenset(name.encode() for name in HOP_BY_HOP | {"date", "server"})

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


class _Seen:
    """What the request statistics record of one proxied request."""

    __slots__ = ("principal", "route", "status")

    def __init__(self) -> None:
        self.route, self.principal, self.status = UNMATCHED_ROUTE, ANONYMOUS, 500


class ProxyApp:
    def __init__(
        self,
        routes_file: str | Path | None = None,
        jwt_verifier: Any = None,
        redis_url: str | None = None,
        store_url: str | None = None,
        caches_file: str | Path | None = None,
        networks: Any = None,
        max_body_bytes: int | None = None,
        request_stats: Any = None,
    ):
        if routes_file is None:
            from orchestration.settings import get_settings

            settings = get_settings()
            routes_file, redis_url = settings.routes_file, redis_url or settings.redis_url
            store_url = store_url or settings.store_url
        self.routes_file = Path(routes_file)
        self.redis_url = redis_url  # where shared rate limits count
        # Where routes' answer caches live (the cache namespaces of caches.yaml; default: the settings').
        self.store_url, self.caches_file = store_url, caches_file
        self._answer_caches: dict[Any, Any] = {}  # AnswerCacheSpec -> AnswerCache
        # The objects the admin API owns (none without a store: a proxy of the file alone).
        self.api = ApiDeclarations(store_url) if store_url else None
        self.jwt_verifier = jwt_verifier
        # What the platform API's middleware does for its own paths, done here (the gateway hands
        # proxied paths over before its middleware): the address lists (guards.ClientNetworks), the
        # body limit of routes that declare none, and the per-minute request statistics.
        self.networks = networks
        self.max_body_bytes = max_body_bytes
        self.request_stats = request_stats
        self._on_transition = transition_logger(logger)
        self.config = ProxyConfig()
        self.from_file = RoutesFile()  # the file's last good declarations
        self._from_api: dict[str, dict[str, Any]] = {"route": {}, "upstream": {}}  # the last read
        self.origins: dict[tuple[str, str], str] = {}  # (kind, name) -> its owner
        self.last_error: str | None = None
        self._stamp: tuple[Any, Any] | None = None
        self._reloading = threading.Lock()
        self._clients: dict[str, Any] = {}  # upstream name -> aiohttp.ClientSession
        self._authenticated: dict[str, tuple[Any, float]] = {}  # token -> (principal, until)
        self.route_stats: dict[str, dict[str, int]] = {}  # route -> outcome -> requests
        self.consumer_stats: dict[str, dict[str, int]] = {}  # route -> consumer -> requests
        self._latencies: dict[str, tuple[deque, deque]] = {}  # route -> (upstream ms, added ms)
        self.active_checks = ActiveChecks()
        self.documents: dict[str, dict[str, Any]] = {}  # route -> its upstream's OpenAPI document
        self.document_errors: dict[str, str] = {}  # route -> why its document could not be read
        self._merged: tuple[Any, Any, dict[str, Any]] | None = None  # (config, documents, merged)
        self.reload(strict=True)

    # --- configuration -------------------------------------------------------------------------------

    def _current_stamp(self) -> tuple[Any, Any]:
        """What a reload depends on: the file's modification time and size, the API objects' revision."""
        try:
            stat = os.stat(self.routes_file)
            file_stamp = (stat.st_mtime, stat.st_size)
        except FileNotFoundError:
            file_stamp = None
        return file_stamp, self._api_revision()

    def _api_revision(self) -> Any:
        from sqlalchemy.exc import SQLAlchemyError

        if self.api is None:
            return None
        try:
            return self.api.revision()
        except SQLAlchemyError:  # the store is down: looked at again by the next check
            return "unavailable"

    def reload(self, strict: bool = False) -> bool:
        """Read the routes file and the API's objects again (blocking: called at start and from a
        worker thread); whether the configuration changed. `strict`: a bad file raises (at start);
        else the error is logged and kept in `status()`, and the file's last good declarations stay."""
        with self._reloading:
            stamp = self._current_stamp()
            errors = []
            try:
                self.from_file = load_routes_file(self.routes_file)
            except SpecError as exc:
                if strict:
                    raise
                errors.append(str(exc))
            if self.api is not None:
                from sqlalchemy.exc import SQLAlchemyError

                try:
                    self._from_api = self.api.objects()
                except SQLAlchemyError as exc:  # the gateway still starts and serves the file's routes
                    reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
                    errors.append(f"the admin API's routes and upstreams could not be read: {reason}")
            try:
                declarations = merge(self.from_file, self.routes_file, self._from_api)
                config = compile_config(
                    declarations.document,
                    self.config,
                    self._on_transition,
                    str(self.routes_file),
                    self.redis_url,
                    self._open_answers,
                )
            except SpecError as exc:
                if strict:
                    raise
                errors.append(str(exc))
                config = None
            self._stamp = stamp
            self.last_error = "\n".join(errors) or None
            if errors:
                logger.error("proxy routes not (all) reloaded, the running ones stay: %s", self.last_error)
            if config is None:
                return False
            self.config, self.origins = config, declarations.origins
            return True

    def _open_answers(self, spec: Any) -> Any:
        """A route's answer cache: its namespace of caches.yaml (KeyError when unknown)."""
        answers = self._answer_caches.get(spec)
        if answers is None:
            from resources.cache import open_cache
            from resources.cache.http_answers import AnswerCache

            cache = open_cache(
                spec.namespace,
                redis_url=self.redis_url,
                database_url=self.store_url,
                caches_file=str(self.caches_file) if self.caches_file else None,
            )
            answers = self._answer_caches[spec] = AnswerCache(cache, spec.ttl_s)
        return answers

    async def watch(self) -> None:
        """Reload whenever the routes file or the API's objects change (looked at every
        `RELOAD_CHECK_S`, in a worker thread), until cancelled (the gateway's lifespan runs it)."""
        import anyio

        await self.refresh_documents()
        documents_at = time.monotonic()
        while True:
            await anyio.sleep(RELOAD_CHECK_S)
            try:
                changed = await anyio.to_thread.run_sync(lambda: self._current_stamp() != self._stamp)
                if changed:
                    changed = await anyio.to_thread.run_sync(self.reload)
            except Exception:  # noqa: BLE001 - the store may be down: the running configuration stays
                logger.warning("could not look for proxy configuration changes; will retry", exc_info=True)
                continue
            if changed or time.monotonic() - documents_at > DOCUMENT_REFRESH_S:
                await self.refresh_documents()
                documents_at = time.monotonic()

    # --- the upstreams' OpenAPI documents ------------------------------------------------------------

    async def refresh_documents(self) -> None:
        """Fetch (or read) the OpenAPI document of every route declaring `openapi`; one that cannot be
        had keeps its last good copy, its reason in `document_errors`."""
        documents, errors = {}, {}
        for route in self.config.routes:
            source = route.spec.openapi
            if source is None:
                continue
            try:
                documents[route.name] = await self._document(route, source)
            except Exception as exc:  # noqa: BLE001 - any failure is the route's, named in the status
                errors[route.name] = f"{type(exc).__name__}: {exc}"
                if route.name in self.documents:
                    documents[route.name] = self.documents[route.name]
                logger.warning("proxy route %s: its OpenAPI document: %s", route.name, errors[route.name])
        self.documents, self.document_errors = documents, errors

    async def _document(self, route: Any, source: Any) -> dict[str, Any]:
        import yaml

        if source.file is not None:
            path = self.routes_file.parent / source.file
            text = await _in_thread(path.read_text)
        else:
            upstream = self.config.upstreams[route.spec.primary_upstream]
            url = upstream.targets[0].url + source.url if source.url.startswith("/") else source.url
            client = self._client(upstream)
            import aiohttp

            async with client.get(url, timeout=aiohttp.ClientTimeout(total=DOCUMENT_TIMEOUT_S)) as response:
                if response.status != 200:
                    raise ValueError(f"GET {url} answered {response.status}")
                text = await response.text()
        document = yaml.safe_load(text)
        if not isinstance(document, dict) or not isinstance(document.get("paths"), dict):
            raise ValueError("not an OpenAPI document (no paths)")
        return document

    def openapi(self, base: dict[str, Any]) -> dict[str, Any]:
        """`base` (the platform API's document) with every route, built once per configuration and set
        of documents."""
        config, documents = self.config, self.documents
        if self._merged is None or self._merged[0] is not config or self._merged[1] is not documents:
            self._merged = (config, documents, merged_document(base, config, documents, PROXY_PREFIX))
        return self._merged[2]

    def status(self) -> dict[str, Any]:
        """The configuration's state and this process's figures (`GET /v1/analytics/proxy`)."""
        from orchestration.gateway.metrics import percentiles

        config = self.config
        routes = {}
        for route in config.routes:
            upstream_ms, added_ms = self._latencies.get(route.name, ((), ()))
            routes[route.name] = {
                "origin": self.origins.get(("route", route.name)),
                "outcomes": dict(self.route_stats.get(route.name, {})),
                "consumers": dict(self.consumer_stats.get(route.name, {})),
                "upstream_latency_ms": dict(
                    zip(("p50", "p95", "p99"), percentiles(list(upstream_ms)), strict=True)
                ),
                "added_latency_ms": dict(
                    zip(("p50", "p95", "p99"), percentiles(list(added_ms)), strict=True)
                ),
                "cache": dict(route.answers.figures.__dict__) if route.answers is not None else None,
                "rate_limits": [
                    {
                        "policy": limiter.spec.name,
                        "rejected": limiter.rejected,
                        "fallbacks": limiter.fallbacks,
                    }
                    | ({"decisions": limiter.decisions} if hasattr(limiter, "decisions") else {})
                    for limiter in route.limiters
                ],
            }
        return {
            "routes_file": str(self.routes_file),
            "loaded_at": config.loaded_at,
            "last_error": self.last_error,
            "routes": routes,
            "upstreams": [
                {**upstream.to_json(), "origin": self.origins.get(("upstream", upstream.name))}
                for upstream in config.upstreams.values()
            ],
        }

    def _observe(self, route: str, consumer: str | None, upstream_s: float, total_s: float) -> None:
        """One answered request's figures: plain appends on the event loop, no lock."""
        upstream_ms, added_ms = self._latencies.setdefault(
            route, (deque(maxlen=LATENCY_SAMPLES), deque(maxlen=LATENCY_SAMPLES))
        )
        upstream_ms.append(upstream_s * 1000)
        added_ms.append(max(0.0, total_s - upstream_s) * 1000)
        counts = self.consumer_stats.setdefault(route, {})
        name = consumer or "anonymous"
        counts[name] = counts.get(name, 0) + 1

    async def run_health_checks(self) -> None:
        """Probe the targets of upstreams declaring `health.active`, until cancelled (the gateway's
        lifespan runs it)."""
        await self.active_checks.run(lambda: self.config)

    async def aclose(self) -> None:
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await client.close()
        for route in self.config.routes:
            for limiter in route.limiters:
                closing = getattr(limiter, "aclose", None)
                if closing is not None:
                    await closing()

    # --- the request path ----------------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # the gateway hands over HTTP only; its lifespan closes us
            return
        started = time.perf_counter()
        seen = _Seen()

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                seen.status = message["status"]
            await send(message)

        try:
            await self._handle(scope, receive, sending, started, seen)
        finally:
            if self.request_stats is not None:
                latency_s = time.perf_counter() - started
                self.request_stats.observe(
                    seen.route, scope["method"], seen.principal, seen.status, latency_s
                )

    async def _handle(
        self, scope: dict[str, Any], receive: Receive, send: Send, started: float, seen: _Seen
    ) -> None:
        client_ip = (scope.get("client") or (None,))[0]
        if self.networks is not None and not self.networks.allows(client_ip):
            await _problem(
                send, 403, "your address may not use this gateway", scope["path"], slug="ip-denied"
            )
            return
        config = self.config  # read once: a reload mid-request does not mix configurations
        method = scope["method"]
        path = scope.get("path", "/")
        prefix = scope.get("root_path", "")
        if prefix and path.startswith(prefix):
            path = path[len(prefix) :] or "/"
        headers = {
            name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]
        }
        origin = headers.get("origin")
        if method == "OPTIONS" and origin and "access-control-request-method" in headers:
            asked = headers["access-control-request-method"].upper()
            preflight = config.match(asked, path, headers.get("host"), headers)
            if preflight is not None and preflight.route.cors is not None:
                await self._preflight(send, preflight.route, origin, asked, path)
                return
        matched = config.match(method, path, headers.get("host"), headers)
        if matched is None:
            await _problem(send, 404, f"no proxy route for {method} {path}", path)
            return
        route = matched.route
        if route.cors is not None and origin and route.cors.allows(origin):
            send = _adding_headers(send, route.cors.answer_headers(origin))
        seen.route = f"/proxy/{route.name}"  # the label of the gateway's request statistics
        if matched.upstream is None:  # a version the route does not have
            self._count(route.name, "unknown_version")
            await _problem(send, 404, matched.problem or "no such version", path)
            return
        consumer = None
        if route.scopes:
            refusal, consumer = await self._authorize(headers, route.scopes)
            if consumer is not None:
                seen.principal = consumer
            if refusal is not None:
                self._count(route.name, "refused")
                await _problem(send, refusal[0], refusal[1], path, {"WWW-Authenticate": "Bearer"})
                return
        limit_headers: list[tuple[bytes, bytes]] = []
        if route.limiters:
            # In the declared order, stopping at the first refusal: a refused request uses up no
            # later limit (an earlier one has counted it).
            verdicts, refused = [], None
            for limiter in route.limiters:
                verdict = await limiter.check(limiter.key(consumer, client_ip))
                verdicts.append(verdict)
                if not verdict.allowed:
                    limiter.rejected += 1
                    refused = verdict
                    break
            tightest = refused or min(verdicts, key=lambda verdict: verdict.remaining / verdict.limit)
            limit_headers = ratelimit_headers(tightest)
            if refused is not None:
                self._count(route.name, "rate_limited")
                extra = {name.decode(): value.decode() for name, value in limit_headers}
                await _problem(
                    send,
                    429,
                    f"route {route.name}: over the rate limit {refused.policy} ({refused.limit} per "
                    f"{refused.window_s:g} s)",
                    path,
                    {"Retry-After": str(max(1, math.ceil(refused.reset_s))), **extra},
                )
                return
        limit = self.max_body_bytes if route.spec.max_body_bytes is None else route.spec.max_body_bytes
        body = await _read_body(receive, headers, limit)
        if body is None:
            self._count(route.name, "too_large")
            detail = f"route {route.name}: the request body is over {limit} bytes"
            await _problem(send, 413, detail, path, slug="body-too-large")
            return
        upstream = config.upstreams[matched.upstream]
        query = scope.get("query_string", b"").decode("latin-1")
        facts = RequestFacts(path, headers, dict(parse_qsl(query)), client_ip)
        context = {
            "route": route.name,
            "consumer": consumer,
            "method": method,
            "path": path,
            "query": facts.query,
        }
        try:
            await self._forward(
                send,
                method,
                query,
                headers,
                body,
                matched,
                upstream,
                facts,
                started,
                [*limit_headers, *matched.response_headers],
                context,
            )
        except TransformFailed as exc:
            self._count(route.name, f"{exc.status // 100}xx")
            await _problem(send, exc.status, exc.detail, path)

    async def _forward(
        self,
        send: Send,
        method: str,
        query: str,
        headers: dict[str, str],
        body: bytes,
        matched: RouteMatch,
        upstream: Upstream,
        facts: RequestFacts,
        started: float,
        extra_headers: list[tuple[bytes, bytes]],
        context: dict[str, Any],
    ) -> None:
        """Try the upstream's targets; TransformFailed when a transform cannot apply."""
        import aiohttp

        route = matched.route
        path = facts.path
        client = self._client(upstream)
        forwarded = [(name, value) for name, value in headers.items() if name not in NOT_FORWARDED]
        forwarded.append(("x-forwarded-for", _forwarded_for(headers, facts.client_ip)))
        forwarded.append(("x-forwarded-host", headers.get("host", "")))
        forwarded.append(("x-forwarded-proto", headers.get("x-forwarded-proto", "http")))
        if route.transform is not None:
            pairs = parse_qsl(query, keep_blank_values=True)
            forwarded, pairs, body = route.transform.request_parts(forwarded, pairs, body, context)
            query = urlencode(pairs)
        cached = cache_key = None
        validators: dict[str, str] = {}
        # The client's own conditional requests go through uncached: its validators are not ours.
        answers = (
            route.answers if method in CACHED_METHODS and not CONDITIONAL.intersection(headers) else None
        )
        if answers is not None:
            cache_key = _answer_key(method, upstream, matched, query, headers, context["consumer"])
            cached, validators = await _in_thread(answers.consult, cache_key)
            if cached is not None and not validators and cached.fresh:
                await self._relay(
                    send, _StoredAnswer(cached.value), 0.0, time.perf_counter() - started,
                    [*extra_headers, CACHE_HIT], route.transform, context,
                )  # fmt: skip
                self._count(route.name, "cache_hit")
                self._observe(route.name, context["consumer"], 0.0, time.perf_counter() - started)
                return
            forwarded += [(name.lower(), value) for name, value in validators.items()]
        retries = route.retries(upstream) if method in IDEMPOTENT else 0
        client_timeout, total_s = route.client_timeout(upstream)
        options = {} if client_timeout is None else {"timeout": client_timeout}
        deadline = started + total_s if total_s is not None else None
        upstream.retry_budget.request()
        tried: set[Target] = set()
        failure: tuple[int, str] | None = None
        too_slow = (504, f"route {route.name}: upstream {upstream.name} did not answer in time")

        def may_retry() -> bool:
            # Another target, within the route's retries and the upstream's retry budget.
            return len(tried) <= retries and upstream.retry_budget.try_retry()

        while True:
            target = upstream.pick(facts, tried)
            if target is None:
                break
            tried.add(target)
            url = target.url + matched.upstream_path + (f"?{query}" if query else "")
            target.started()
            asked = time.perf_counter()
            try:
                request = client.request(
                    method,
                    url,
                    headers=forwarded,
                    data=body or None,
                    allow_redirects=False,
                    skip_auto_headers=SKIPPED_AUTO_HEADERS,
                    **options,
                )
                if deadline is None:
                    response = await request
                else:
                    async with asyncio.timeout(max(0.0, deadline - asked)):
                        response = await request
            except TimeoutError:
                target.finished(time.perf_counter() - asked)
                target.breaker.record(False)
                count_answer(target, False, upstream.spec.health.passive, upstream.name)
                failure = too_slow
                if (deadline is None or time.perf_counter() < deadline) and may_retry():
                    continue
                break
            except aiohttp.ClientError as exc:
                target.finished(time.perf_counter() - asked)
                target.breaker.record(False)
                count_answer(target, False, upstream.spec.health.passive, upstream.name)
                failure = (
                    502,
                    f"route {route.name}: upstream {upstream.name} unreachable ({type(exc).__name__})",
                )
                if may_retry():
                    continue
                break
            answered = time.perf_counter()
            ok = response.status < 500
            target.breaker.record(ok)
            count_answer(target, ok, upstream.spec.health.passive, upstream.name)
            if not ok and retries and len(tried) <= retries and may_retry():
                target.finished(answered - asked)
                response.release()
                failure = (502, f"route {route.name}: upstream {upstream.name} answered {response.status}")
                continue
            try:
                relayed, cache_status = response, ()
                if answers is not None:
                    relayed, cache_status = await self._through_cache(
                        answers, cache_key, cached, validators, response, url, route.name
                    )
                await self._relay(
                    send,
                    relayed,
                    answered - asked,
                    answered - started,
                    [*extra_headers, *cache_status],
                    route.transform,
                    context,
                )
            finally:
                finished = time.perf_counter()
                target.finished(finished - asked)
                response.release()
            self._count(route.name, f"{response.status // 100}xx")
            self._observe(route.name, context["consumer"], answered - asked, finished - started)
            return
        if failure is None:
            self._count(route.name, "unavailable")
            retry_after = upstream.retry_after_s()
            await _problem(
                send,
                503,
                f"route {route.name}: no target of upstream {upstream.name} can take requests now "
                "(circuit open or ejected)",
                path,
                {"Retry-After": str(int(retry_after + 0.999))},
            )
            return
        self._count(route.name, f"{failure[0] // 100}xx")
        await _problem(send, failure[0], failure[1], path)

    async def _through_cache(
        self,
        answers: Any,
        key: str,
        cached: Any,
        validators: dict[str, str],
        response: Any,
        url: str,
        route: str,
    ) -> tuple[Any, tuple[tuple[bytes, bytes], ...]]:
        """(what to relay, its X-Cache-Status): the kept answer after a 304 to our validators; a
        successful answer of known size, read whole and kept; anything else as it came."""
        from resources.cache.http_answers import stored_answer

        if response.status == 304 and cached is not None and validators:
            stored = await _in_thread(answers.renew, key, cached, response.headers)
            return _StoredAnswer(stored), (CACHE_REVALIDATED,)
        length = response.content_length
        if not 200 <= response.status < 300 or length is None or length > CACHED_BODY_BYTES:
            return response, (CACHE_BYPASS,)
        content = await _bounded_read(response, CACHED_BODY_BYTES, route)
        pairs = [(name, value) for name, value in response.headers.items() if name.lower() not in HOP_BY_HOP]
        stored = stored_answer(response.status, url, pairs, content)
        await _in_thread(answers.keep, key, response.status, response.headers, lambda: stored)
        return _StoredAnswer(stored), (CACHE_MISS,)

    async def _relay(
        self,
        send: Send,
        response: Any,
        upstream_s: float,
        before_body_s: float,
        extra_headers: list[tuple[bytes, bytes]],
        transform: RouteTransform | None,
        context: dict[str, Any],
    ) -> None:
        """The upstream's answer to the client: streamed as it comes, or whole when a response body
        transform needs it (TransformFailed 502 when it is not JSON or too large)."""
        headers = [
            (name.lower(), value) for name, value in response.raw_headers if name.lower() not in NOT_RELAYED
        ]
        status = response.status
        whole: bytes | None = None
        if transform is not None:
            status = transform.response_status(status)
            if transform.reads_response_body:
                whole = await _bounded_read(response, transform.response.max_body_bytes, context["route"])
                whole = transform.response_body_of(whole, context)
                dropped = {b"content-length", b"content-encoding", b"content-type"}
                headers = [(name, value) for name, value in headers if name not in dropped]
                headers += [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(whole)).encode()),
                ]
            pairs = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in headers]
            headers = [
                (name.lower().encode("latin-1"), value.encode("latin-1"))
                for name, value in transform.response_headers(pairs, context)
            ]
        headers += extra_headers
        headers.append((b"via", b"1.1 junction"))
        headers.append((b"x-junction-upstream-latency", f"{upstream_s * 1000:.1f}".encode()))
        headers.append((b"x-junction-proxy-latency", f"{(before_body_s - upstream_s) * 1000:.1f}".encode()))
        length = response.content_length
        if whole is None and length is not None and length <= WHOLE_BODY_BYTES:
            whole = await response.read()  # small and sized: one send instead of a stream of them
        await send({"type": "http.response.start", "status": status, "headers": headers})
        if whole is not None:
            await send({"type": "http.response.body", "body": whole, "more_body": False})
            return
        async for chunk in response.content.iter_any():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _preflight(self, send: Send, route: Any, origin: str, asked: str, path: str) -> None:
        """A CORS preflight of a route with `cors`: answered here, no credentials needed."""
        policy = route.cors
        if not policy.allows(origin):
            self._count(route.name, "cors_refused")
            await _problem(send, 403, f"route {route.name}: the origin {origin} may not call it", path)
            return
        self._count(route.name, "preflight")
        headers = [*policy.preflight_headers(origin), (b"content-length", b"0")]
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _client(self, upstream: Upstream) -> Any:
        """The upstream's pooled aiohttp session, opened in the running loop on first use. aiohttp,
        not httpx: `benchmarks/proxy.py` measured httpx's pool at about a tenth of a bare aiohttp proxy's
        requests per second on the same upstream."""
        client = self._clients.get(upstream.name)
        if client is None:
            import aiohttp

            client = self._clients[upstream.name] = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256, keepalive_timeout=30),
                timeout=aiohttp.ClientTimeout(
                    sock_connect=upstream.connect_timeout_s, sock_read=upstream.read_timeout_s
                ),
                auto_decompress=False,  # bodies pass through as the upstream encoded them
                cookie_jar=aiohttp.DummyCookieJar(),  # cookies belong to the clients, not the proxy
            )
        return client

    def _count(self, route: str, outcome: str) -> None:
        counts = self.route_stats.setdefault(route, {})
        counts[outcome] = counts.get(outcome, 0) + 1

    async def _authorize(
        self, headers: dict[str, str], scopes: tuple[str, ...]
    ) -> tuple[tuple[int, str] | None, str | None]:
        """(None, the caller's principal) when its key or JWT covers every scope, else ((status,
        reason), None)."""
        import anyio

        from orchestration.kernel.principals import AuthenticationError, authenticate

        authorization = headers.get("authorization", "")
        token = (
            authorization[7:].strip()
            if authorization.lower().startswith("bearer ")
            else headers.get("x-api-key")
        )
        if not token:
            return (401, "send an API key as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"), None
        now = time.monotonic()
        cached = self._authenticated.get(token)
        if cached is not None and cached[1] > now:
            principal = cached[0]
        else:
            try:
                if self.jwt_verifier is not None and looks_like_jwt(token):
                    principal = self.jwt_verifier.principal(token)
                else:
                    principal = await anyio.to_thread.run_sync(authenticate, token)
            except AuthenticationError as exc:
                return (401, exc.reason), None
            except Exception as exc:  # noqa: BLE001 - a JWT the verifier refuses
                return (401, str(getattr(exc, "detail", exc))), None
            if len(self._authenticated) > 10_000:
                self._authenticated.clear()
            self._authenticated[token] = (principal, now + AUTH_CACHE_S)
        missing = [scope for scope in scopes if not principal.allows(scope)]
        if missing:
            return (403, f"this route needs the scope '{missing[0]}'"), None
        return None, principal.name


class ProxyFirst:
    """ASGI app handing `prefix`'d paths to the proxy (its root path extended by the prefix) and
    everything else to the app it wraps."""

    def __init__(self, app: Any, proxy: ProxyApp, prefix: str):
        self.app = app
        self.proxy = proxy
        self.prefix = prefix

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            root = scope.get("root_path", "")
            path = scope["path"]
            relative = path[len(root) :] if root and path.startswith(root) else path
            if relative == self.prefix or relative.startswith(self.prefix + "/"):
                await self.proxy({**scope, "root_path": root + self.prefix}, receive, send)
                return
        await self.app(scope, receive, send)


def _answer_key(
    method: str, upstream: Upstream, matched: RouteMatch, query: str, headers: dict[str, str], consumer: Any
) -> str:
    """One kept answer per upstream path, query, content negotiation and consumer (Kong's proxy-cache
    key): another consumer never reads an answer given to one."""
    from resources.cache.http_answers import answer_key

    negotiated = {name: headers[name] for name in ("accept", "accept-language") if name in headers}
    url = f"{upstream.name}{matched.upstream_path}"
    return answer_key(method, url, dict(sorted(parse_qsl(query))), negotiated, (consumer or "",))


async def _in_thread(function: Callable[..., Any], *arguments: Any) -> Any:
    import anyio

    return await anyio.to_thread.run_sync(function, *arguments)


def _forwarded_for(headers: dict[str, str], client_ip: str | None) -> str:
    earlier = headers.get("x-forwarded-for")
    return f"{earlier}, {client_ip}" if earlier and client_ip else earlier or client_ip or ""


async def _bounded_read(response: Any, limit: int, route: str) -> bytes:
    """The whole answer, decoded (the client passes bodies through as they came, encoded)."""
    import zlib

    chunks, size = [], 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise TransformFailed(502, f"route {route}: upstream answer: over {limit} bytes to transform")
        chunks.append(chunk)
    data = b"".join(chunks)
    encoding = response.headers.get("Content-Encoding", "identity").lower()
    if encoding in ("gzip", "deflate"):
        try:
            return zlib.decompress(data, 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
        except zlib.error as exc:
            raise TransformFailed(
                502, f"route {route}: upstream answer: bad {encoding} body ({exc})"
            ) from None
    if encoding != "identity":
        raise TransformFailed(502, f"route {route}: upstream answer: cannot transform a {encoding} body")
    return data


async def _read_body(receive: Receive, headers: dict[str, str], limit: int | None) -> bytes | None:
    """The request's body; None when it is over `limit` bytes (declared or as it arrives)."""
    declared = headers.get("content-length")
    if limit is not None and declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if limit is not None and size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def _adding_headers(send: Send, headers: list[tuple[bytes, bytes]]) -> Send:
    async def sending(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *headers]}
        await send(message)

    return sending


class _StoredAnswer:
    """A kept answer (`resources/cache/http_answers.py`) in the shape `_relay` reads of an aiohttp
    response, so a cached answer passes the same transforms and headers as a fresh one."""

    def __init__(self, stored: dict[str, Any]):
        from multidict import CIMultiDict

        from resources.cache.http_answers import stored_content

        self._body = stored_content(stored)
        self.status = stored["status"]
        self.headers = CIMultiDict(stored["headers"])
        self.raw_headers = tuple(
            (name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in stored["headers"]
        ) + ((b"content-length", str(len(self._body)).encode()),)
        self.content_length = len(self._body)
        self.content = self

    async def read(self) -> bytes:
        return self._body

    async def iter_any(self):
        yield self._body

    def release(self) -> None:
        pass


async def _problem(
    send: Send,
    status: int,
    detail: str,
    instance: str,
    headers: dict[str, str] | None = None,
    slug: str | None = None,
) -> None:
    from http import HTTPStatus

    from orchestration.gateway.guards import send_problem
    from orchestration.gateway.problems import status_slug

    await send_problem(
        send, status, HTTPStatus(status).phrase, slug or status_slug(status), detail, instance, headers
    )
