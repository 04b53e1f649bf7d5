"""The webhook dispatcher: delivers the durable subscriptions (`resources/event_stream/subscriptions.py`)
from inside every gateway process, as asyncio tasks started by the gateway's lifespan.

Per subscription, each process runs one worker that reads the subscription's consumer group as its
own consumer (`<host>-<pid>-<random>`), so the processes split the events between them:
1. It reads a page, acknowledges at once what the filter drops, and cuts the rest into deliveries of
   `batch_size` events - with `ordering: {per_key: f}`, each key's events in a lane of their own,
   delivered one after another; lanes (or, unordered, deliveries) go `concurrency` at a time.
2. A delivery is POSTed, signed; a 2xx acknowledges its events. Otherwise it is tried again after an
   exponential backoff (1 s, 2 s, 4 s ... up to `max_backoff`; the receiver's `Retry-After` instead
   when it sends one), and after `max_deliveries` attempts its events go to the stream's dead letter
   with the last status and answer (acknowledged in the same step). `junction events subscriptions
   replay NAME` delivers them again.
3. Each destination (scheme, host, port) has a circuit breaker (the kernel's): while it is open,
   deliveries wait without spending attempts, so a receiver that is down is not hammered and its
   events are not dead-lettered for it.
4. While a delivery is in flight or waiting, its events' pending entries are touched every third of
   `dispatcher_claim_idle_s`: only a dispatcher that stopped touching - it died - has entries idle
   that long, and every worker claims those (`claim_stale`) before reading new events.

At least once: a dispatcher killed between the receiver's answer and the acknowledgement leaves the
events pending, and the one that claims them sends them again with the same delivery ids (counted as
`redelivered`). Attempts are counted per process: a claimed delivery starts again from attempt 1.

Ordered subscriptions (`per_key`) run on one dispatcher at a time: a lease in the platform store,
renewed as entries are touched, which another dispatcher takes over when it expires (it then claims
every pending entry at once - their holder is gone - and delivers those first, in order).

On shutdown (SIGTERM), workers stop reading, in-flight deliveries get `dispatcher_stop_grace_s` to
finish, and whatever is still unanswered then stays pending for another dispatcher to claim.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import deque
from typing import Any

import anyio
import anyio.to_thread

from orchestration.kernel.breaker import BreakerPolicy, Breakers
from orchestration.kernel.times import duration_seconds
from resources.event_stream import EventsLost, EventStreamUnavailable, GroupNotFound, StreamNotFound
from resources.event_stream.aio import AsyncEventStream
from resources.event_stream.core import Event
from resources.event_stream.subscriptions import (
    DeliveryAnswer,
    Subscription,
    SubscriptionRegistry,
    chunks,
    consumer_name,
    create_group,
    dead_letter_entry,
    deliver,
)

logger = logging.getLogger("junction.gateway.dispatcher")
READ_PAGE = 200
READ_BLOCK_MS = 1000
# A backend or store that cannot be reached is tried again after this long.
RETRY_UNAVAILABLE_S = 2.0
LATENCY_SAMPLES = 4096
# Per destination: open at half the calls failing over 10 s (5 calls at least), probe after 5 s.
DESTINATION_BREAKER = BreakerPolicy(
    error_ratio=0.5, min_requests=5, window_s=10, open_for_s=5, max_open_for_s=60
)


class SubscriptionFigures:
    """What this process did for one subscription (Prometheus adds the processes up)."""

    def __init__(self) -> None:
        self.attempts = 0
        self.failures = 0  # attempts that did not get a 2xx
        self.delivered = 0  # events acknowledged after a 2xx
        self.dead_lettered = 0
        self.filtered = 0  # events the filter dropped (acknowledged without a delivery)
        self.redelivered = 0  # events claimed from a dispatcher that died
        self.events_lost = 0  # events retention removed before the group read them
        self.in_flight = 0
        self.breaker_waits = 0
        self.latencies: deque[float] = deque(maxlen=LATENCY_SAMPLES)  # publish -> acknowledged, s
        self.last_status: int | None = None
        self.last_error: str | None = None
        self.last_delivered_at: float | None = None
        self.running = False
        self.holds_lease: bool | None = None

    def quantile_ms(self, q: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return round(ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)] * 1000, 3)

    def to_json(self) -> dict[str, Any]:
        return {
            "running": self.running,
            "holds_lease": self.holds_lease,
            "attempts": self.attempts,
            "failures": self.failures,
            "delivered": self.delivered,
            "dead_lettered": self.dead_lettered,
            "filtered": self.filtered,
            "redelivered": self.redelivered,
            "events_lost": self.events_lost,
            "in_flight": self.in_flight,
            "breaker_waits": self.breaker_waits,
            "latency_p50_ms": self.quantile_ms(0.5),
            "latency_p99_ms": self.quantile_ms(0.99),
            "last_status": self.last_status,
            "last_error": self.last_error,
            "last_delivered_at": self.last_delivered_at,
        }


class Dispatcher:
    """Every subscription's worker in this process; `run()` in a task group, `stop()` to end it."""

    def __init__(
        self,
        events: AsyncEventStream,
        registry: SubscriptionRegistry,
        *,
        refresh_s: float = 5.0,
        claim_idle_s: float = 30.0,
        stop_grace_s: float = 5.0,
    ):
        self.events = events
        self.registry = registry
        self.refresh_s = refresh_s
        self.claim_idle_s = claim_idle_s
        self.stop_grace_s = stop_grace_s
        self.consumer = consumer_name()
        self.breakers = Breakers(DESTINATION_BREAKER)
        self.figures: dict[str, SubscriptionFigures] = {}
        self._workers: dict[str, tuple[Subscription, anyio.CancelScope, SubscriptionWorker]] = {}
        self._stopping = anyio.Event()
        self._stopped = anyio.Event()
        self.client = None

    # --- the life of the dispatcher -------------------------------------------------------------

    async def run(self) -> None:
        import httpx

        try:
            async with (
                httpx.AsyncClient(follow_redirects=False) as client,
                anyio.create_task_group() as tasks,
            ):
                self.client = client
                while not self._stopping.is_set():
                    await self._reconcile(tasks)
                    await self.wait_stopping(self.refresh_s)
                with anyio.move_on_after(self.stop_grace_s):
                    while any(worker.busy for _, _, worker in self._workers.values()):
                        await anyio.sleep(0.05)
                tasks.cancel_scope.cancel()  # what is still unanswered stays pending for a claim
        finally:
            await self._release_leases()
            self._stopped.set()

    async def stop(self) -> None:
        """Stop reading, let in-flight deliveries finish (up to the grace), and return when done."""
        self._stopping.set()
        await self._stopped.wait()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def wait_stopping(self, timeout_s: float) -> None:
        """Return when the dispatcher is told to stop, or after `timeout_s`."""
        with anyio.move_on_after(timeout_s):
            await self._stopping.wait()

    async def _reconcile(self, tasks) -> None:
        """Start a worker per active subscription, restart changed ones, stop removed or paused ones."""
        try:
            declared = {
                s.name: s for s in await anyio.to_thread.run_sync(self.registry.list) if not s.spec.paused
            }
        except Exception:  # noqa: BLE001 - the store may be down: keep the running workers
            logger.warning("could not read the subscriptions; keeping the running ones", exc_info=True)
            return
        for name, (subscription, scope, _worker) in list(self._workers.items()):
            if declared.get(name) != subscription:
                scope.cancel()
                del self._workers[name]
                self.figures[name].running = False
        for name, subscription in declared.items():
            if name not in self._workers:
                figures = self.figures.setdefault(name, SubscriptionFigures())
                worker = SubscriptionWorker(self, subscription, figures)
                scope = anyio.CancelScope()
                self._workers[name] = (subscription, scope, worker)
                tasks.start_soon(self._run_worker, worker, scope)

    async def _run_worker(self, worker: SubscriptionWorker, scope: anyio.CancelScope) -> None:
        with scope:
            worker.figures.running = True
            try:
                while not self.stopping:
                    try:
                        await worker.run()
                    except Exception as exc:  # noqa: BLE001 - one subscription's fault stops no other
                        worker.figures.last_error = f"{type(exc).__name__}: {exc}"
                        logger.exception(
                            "subscription %s: the worker failed; restarting", worker.subscription.name
                        )
                        await anyio.sleep(RETRY_UNAVAILABLE_S)
            finally:
                worker.figures.running = False

    async def _release_leases(self) -> None:
        for subscription, _, worker in list(self._workers.values()):
            if worker.figures.holds_lease:
                with anyio.CancelScope(shield=True):
                    try:
                        await anyio.to_thread.run_sync(
                            self.registry.release_lease, subscription.name, self.consumer
                        )
                    except Exception:  # noqa: BLE001 - it expires by itself
                        logger.debug("could not release a lease", exc_info=True)

    def stats(self, name: str) -> dict[str, Any] | None:
        figures = self.figures.get(name)
        return None if figures is None else figures.to_json()


class SubscriptionWorker:
    """One subscription's deliveries in this process (see the module docstring for the steps)."""

    def __init__(self, dispatcher: Dispatcher, subscription: Subscription, figures: SubscriptionFigures):
        self.dispatcher = dispatcher
        self.subscription = subscription
        self.figures = figures
        self.events = dispatcher.events
        self.consumer = dispatcher.consumer
        self.busy = False
        self.in_flight: set[str] = set()
        self._next_claim = 0.0
        self._claim_all = False
        self._lease_renewed = 0.0

    @property
    def lease_ttl_s(self) -> float:
        return max(self.dispatcher.claim_idle_s, 3 * self.dispatcher.refresh_s)

    async def run(self) -> None:
        subscription = self.subscription
        while not self.dispatcher.stopping:
            try:
                await anyio.to_thread.run_sync(create_group, self.events.sync, subscription)
                break
            except StreamNotFound:
                self.figures.last_error = f"stream {subscription.stream!r} is not declared"
            except EventStreamUnavailable as exc:
                self.figures.last_error = str(exc)
            await anyio.sleep(RETRY_UNAVAILABLE_S)
        while not self.dispatcher.stopping:
            try:
                await self._step()
            except EventsLost as exc:
                self._skip_lost(exc)
                await self.events.set_group_position(subscription.stream, subscription.group, exc.to_id)
            except GroupNotFound:  # the group was removed under us (a flushed Redis): start it again
                logger.error(
                    "subscription %s: its consumer group is gone; creating it again", subscription.name
                )
                await anyio.to_thread.run_sync(create_group, self.events.sync, subscription)
            except (EventStreamUnavailable, StreamNotFound) as exc:
                self.figures.last_error = str(exc)
                await anyio.sleep(RETRY_UNAVAILABLE_S)

    async def _step(self) -> None:
        subscription = self.subscription
        if subscription.key_field and not await self._hold_lease():
            await self.dispatcher.wait_stopping(self.dispatcher.refresh_s)
            return
        batch: list[Event] = []
        if time.monotonic() >= self._next_claim:
            min_idle_ms = 0 if self._claim_all else int(self.dispatcher.claim_idle_s * 1000)
            claimed = await self.events.claim_stale(
                subscription.stream,
                subscription.group,
                self.consumer,
                min_idle_ms=min_idle_ms,
                limit=READ_PAGE,
            )
            batch = sorted(claimed.events, key=lambda event: event.event_id)
            self.figures.redelivered += len(batch)
            if len(batch) < READ_PAGE:
                self._claim_all = False
                self._next_claim = time.monotonic() + self.dispatcher.claim_idle_s / 3
        if not batch:
            batch = await self.events.read_group(
                subscription.stream,
                subscription.group,
                self.consumer,
                limit=READ_PAGE,
                block_ms=READ_BLOCK_MS,
            )
        if batch:
            self.busy = True
            try:
                await self._process(batch)
            finally:
                self.busy = False

    def _skip_lost(self, exc: EventsLost) -> None:
        # Loud, never silent: the range is logged, counted and kept as the last error.
        self.figures.events_lost += 1
        self.figures.last_error = str(exc)
        logger.error("subscription %s: %s; continuing after %s", self.subscription.name, exc, exc.to_id)

    async def _hold_lease(self) -> bool:
        try:
            held = await anyio.to_thread.run_sync(
                self.dispatcher.registry.acquire_lease,
                self.subscription.name,
                self.consumer,
                self.lease_ttl_s,
            )
        except Exception:  # noqa: BLE001 - the store is down: keep what we had until it expires
            logger.warning(
                "subscription %s: could not renew its lease", self.subscription.name, exc_info=True
            )
            held = (
                bool(self.figures.holds_lease)
                and time.monotonic() - self._lease_renewed < self.lease_ttl_s / 2
            )
        else:
            if held:
                self._lease_renewed = time.monotonic()
        if held and not self.figures.holds_lease:
            self._claim_all = True  # the previous holder is gone: its pending events come first
            self._next_claim = 0.0
        self.figures.holds_lease = held
        return held

    # --- one page -------------------------------------------------------------------------------

    async def _process(self, batch: list[Event]) -> None:
        subscription = self.subscription
        matching: list[Event] = []
        dropped: list[str] = []
        for event in batch:
            if subscription.matches(event.payload):
                matching.append(event)
            else:
                dropped.append(event.id)
        if dropped:
            await self.events.ack(subscription.stream, subscription.group, dropped)
            self.figures.filtered += len(dropped)
        size = subscription.spec.batch_size
        if subscription.key_field:
            by_key: dict[str, list[Event]] = {}
            for event in matching:
                by_key.setdefault(subscription.key_of(event.payload), []).append(event)
            lanes = [list(chunks(events, size)) for events in by_key.values()]
        else:
            lanes = [[chunk] for chunk in chunks(matching, size)]
        if not lanes:
            return
        limiter = anyio.CapacityLimiter(subscription.spec.concurrency)
        async with anyio.create_task_group() as keeper:
            keeper.start_soon(self._keep_alive)
            async with anyio.create_task_group() as lanes_group:
                for lane in lanes:
                    lanes_group.start_soon(self._run_lane, lane, limiter)
            keeper.cancel_scope.cancel()

    async def _run_lane(self, lane: list[list[Event]], limiter: anyio.CapacityLimiter) -> None:
        async with limiter:
            for delivery in lane:
                await self._deliver(delivery)

    async def _keep_alive(self) -> None:
        """Touch the in-flight events (and renew an ordered subscription's lease) while they wait."""
        interval = self.dispatcher.claim_idle_s / 3
        subscription = self.subscription
        while True:
            await anyio.sleep(interval)
            try:
                if self.in_flight:
                    await self.events.touch(
                        subscription.stream, subscription.group, self.consumer, sorted(self.in_flight)
                    )
                if subscription.key_field:
                    await self._hold_lease()
            except Exception:  # noqa: BLE001 - the next touch may succeed; a claim is at-least-once
                logger.warning(
                    "subscription %s: could not touch its pending events", subscription.name, exc_info=True
                )

    async def _deliver(self, events: list[Event]) -> None:
        subscription, figures = self.subscription, self.figures
        breaker = self.dispatcher.breakers[subscription.destination]
        ids = [event.id for event in events]
        self.in_flight.update(ids)
        figures.in_flight += len(ids)
        attempt = 0
        try:
            while True:
                if not breaker.allow():
                    figures.breaker_waits += 1
                    await anyio.sleep(max(0.05, breaker.retry_after_s()))
                    continue
                attempt += 1
                figures.attempts += 1
                try:
                    answer = await deliver(self.dispatcher.client, subscription, events, attempt)
                except BaseException:
                    breaker.release()
                    raise
                breaker.record(not answer.receiver_unhealthy)
                figures.last_status = answer.status
                if answer.ok:
                    await self._acknowledge(events)
                    return
                figures.failures += 1
                figures.last_error = (
                    f"HTTP {answer.status}: {answer.detail}" if answer.status else answer.detail
                )
                if attempt >= subscription.spec.max_deliveries:
                    await self._dead_letter(events, attempt, answer)
                    return
                await anyio.sleep(self._backoff_s(attempt, answer))
        finally:
            self.in_flight.difference_update(ids)
            figures.in_flight -= len(ids)

    def _backoff_s(self, attempt: int, answer: DeliveryAnswer) -> float:
        spec = self.subscription.spec
        cap = duration_seconds(spec.max_backoff)
        if answer.retry_after_s is not None:
            return min(max(answer.retry_after_s, 0.0), cap)
        wait = duration_seconds(spec.initial_backoff) * 2 ** (attempt - 1)
        return min(wait, cap) * random.uniform(0.8, 1.2)  # jitter: retries of many events spread out

    async def _acknowledge(self, events: list[Event]) -> None:
        subscription, figures = self.subscription, self.figures
        with anyio.CancelScope(shield=True):  # the receiver has them: do not send them twice for nothing
            await self.events.ack(subscription.stream, subscription.group, [event.id for event in events])
        now = time.time()
        figures.delivered += len(events)
        figures.last_delivered_at = now
        figures.latencies.extend(max(0.0, now - event.event_id.ms / 1000) for event in events)

    async def _dead_letter(self, events: list[Event], attempts: int, answer: DeliveryAnswer) -> None:
        subscription = self.subscription
        records = {
            event.id: dead_letter_entry(subscription, event, self.consumer, attempts, answer)
            for event in events
        }
        with anyio.CancelScope(shield=True):
            moved = await self.events.dead_letter(subscription.stream, subscription.group, records)
        self.figures.dead_lettered += len(moved)
        logger.warning(
            "subscription %s: %d event(s) dead-lettered after %d attempts (last: %s)",
            subscription.name,
            len(moved),
            attempts,
            self.figures.last_error,
        )
