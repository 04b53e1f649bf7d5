"""Circuit breakers and retry budgets: stop calling what keeps failing, find out cheaply when it is
back, and never let retries multiply the load on something already struggling.

One implementation for every outgoing call of the platform: the reverse proxy (per target and per
upstream), webhook deliveries and workflow HTTP steps.

States (purgatory's state machine is the model, with Envoy's and resilience4j's rules for opening):
- **closed**: calls go through; each outcome is counted in a rolling window of `window` split into
  `buckets`. When the window holds at least `min_requests` calls and the share of failures reaches
  `error_ratio`, the breaker opens.
- **open**: calls are refused at once (`allow()` is False, `retry_after_s()` says for how long) for
  `open_for`; each time it opens again without having closed in between, that time doubles, up to
  `max_open_for`.
- **half-open**: after `open_for`, up to `half_open_probes` calls at a time go through as probes;
  `close_after` successes in a row close it (the window starts empty), one failure opens it again.

Written here rather than taken from a library: pybreaker and purgatory open after N consecutive
failures, not at an error ratio over a rolling window with a minimum number of calls; neither bounds
the number of probes in flight while half-open; and the proxy's hot path wants an `allow` / `record`
pair (the outcome is known after the answer arrives, and is not always an exception) rather than a
wrapped call. The window is a rolling counter of buckets (`RollingCounts`): its ratio is exact to one
bucket's length.

A `RetryBudget` (Finagle's, as Envoy's `retry_budget`) lets retries add at most `ratio` of the first
attempts of the last `window`, plus `min_per_second` a second so that little traffic can still retry:
when every target fails, retries stay a bounded share of the load instead of multiplying it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from orchestration.kernel.times import DurationText, duration_seconds

State = Literal["closed", "open", "half_open"]


class BreakerSpec(BaseModel):
    """A breaker's policy as declared in YAML (durations as the kernel's durations)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    error_ratio: float = Field(default=0.5, gt=0, le=1, description="Failures / calls that open it")
    min_requests: int = Field(default=20, ge=1, description="Calls in the window before it can open")
    window: DurationText = Field(default="10s", description="The rolling window the ratio is over")
    buckets: int = Field(default=10, ge=1, le=600, description="The window's resolution")
    open_for: DurationText = Field(default="5s", description="Refusing before the first probe")
    max_open_for: DurationText = Field(default="60s", description="open_for doubles on repeat up to this")
    half_open_probes: int = Field(default=1, ge=1, description="Probes in flight at once when half-open")
    close_after: int = Field(default=2, ge=1, description="Probe successes in a row that close it")

    def policy(self) -> BreakerPolicy:
        return BreakerPolicy(
            error_ratio=self.error_ratio,
            min_requests=self.min_requests,
            window_s=duration_seconds(self.window),
            buckets=self.buckets,
            open_for_s=duration_seconds(self.open_for),
            max_open_for_s=max(duration_seconds(self.max_open_for), duration_seconds(self.open_for)),
            half_open_probes=self.half_open_probes,
            close_after=self.close_after,
        )


@dataclass(frozen=True)
class BreakerPolicy:
    error_ratio: float = 0.5
    min_requests: int = 20
    window_s: float = 10.0
    buckets: int = 10
    open_for_s: float = 5.0
    max_open_for_s: float = 60.0
    half_open_probes: int = 1
    close_after: int = 2


@dataclass(frozen=True)
class Transition:
    breaker: str
    old: State
    new: State
    at: float  # epoch seconds
    reason: str


class RollingCounts:
    """`width` counters over the last `window_s` seconds, in `buckets` slices (exact to one slice).
    Not locked: its owner holds a lock around it."""

    def __init__(self, window_s: float, buckets: int, width: int, clock: Callable[[], float]):
        self._bucket_s = window_s / buckets
        self._clock = clock
        # Per bucket: [bucket number, counter, counter, ...].
        self._buckets = [[-1] + [0] * width for _ in range(buckets)]

    def add(self, *amounts: int) -> None:
        number = int(self._clock() // self._bucket_s)
        bucket = self._buckets[number % len(self._buckets)]
        if bucket[0] != number:
            bucket[:] = [number] + [0] * (len(bucket) - 1)
        for index, amount in enumerate(amounts, start=1):
            bucket[index] += amount

    def totals(self) -> list[int]:
        oldest = int(self._clock() // self._bucket_s) - len(self._buckets) + 1
        sums = [0] * (len(self._buckets[0]) - 1)
        for bucket in self._buckets:
            if bucket[0] >= oldest:
                for index in range(len(sums)):
                    sums[index] += bucket[index + 1]
        return sums

    def clear(self) -> None:
        for bucket in self._buckets:
            bucket[:] = [-1] + [0] * (len(bucket) - 1)


class CircuitBreaker:
    """One breaker. `allow()` before a call, `record(ok)` after each allowed call (or `release()`
    when an allowed call was not made). Thread-safe; the closed path costs one lock and a few adds."""

    def __init__(
        self,
        name: str,
        policy: BreakerPolicy | None = None,
        on_transition: Callable[[Transition], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.name = name
        self.policy = policy or BreakerPolicy()
        self.on_transition = on_transition
        self._clock = clock
        self._lock = threading.Lock()
        self._window = RollingCounts(self.policy.window_s, self.policy.buckets, 2, clock)  # calls, failures
        self.state: State = "closed"
        self._opened_at = 0.0
        self._open_for_s = self.policy.open_for_s
        self._probes_in_flight = 0
        self._probe_successes = 0
        self.transitions = 0
        self.refused = 0

    # --- the call path -------------------------------------------------------------------------------

    def allow(self) -> bool:
        """Whether a call may go now (half-open: as one of the limited probes)."""
        if self.state == "closed":  # unlocked read: the common case stays cheap
            return True
        with self._lock:
            if self.state == "open":
                if self._clock() - self._opened_at < self._open_for_s:
                    self.refused += 1
                    return False
                self._move("half_open", f"open for {self._open_for_s:g} s")
            if self.state == "half_open":
                if self._probes_in_flight >= self.policy.half_open_probes:
                    self.refused += 1
                    return False
                self._probes_in_flight += 1
            return True

    def record(self, ok: bool) -> None:
        """The outcome of a call `allow()` let through."""
        now = self._clock()
        with self._lock:
            if self.state == "half_open":
                self._probes_in_flight = max(0, self._probes_in_flight - 1)
                if not ok:
                    self._open(now, "a probe failed", repeat=True)
                    return
                self._probe_successes += 1
                if self._probe_successes >= self.policy.close_after:
                    self._window.clear()
                    self._open_for_s = self.policy.open_for_s
                    self._move("closed", f"{self._probe_successes} probe(s) succeeded")
                return
            if self.state == "open":
                return  # a call let through before it opened; the window is no longer counted
            self._window.add(1, 0 if ok else 1)
            if not ok:
                calls, failures = self._window.totals()
                if calls >= self.policy.min_requests and failures >= self.policy.error_ratio * calls:
                    self._open(now, f"{failures} of {calls} calls failed in {self.policy.window_s:g} s")

    def release(self) -> None:
        """An allowed call that was not made (a probe slot goes back)."""
        with self._lock:
            if self.state == "half_open":
                self._probes_in_flight = max(0, self._probes_in_flight - 1)

    def retry_after_s(self) -> float:
        """While open: the seconds until the next probe may go (0 otherwise)."""
        if self.state != "open":
            return 0.0
        return max(0.0, self._open_for_s - (self._clock() - self._opened_at))

    def call(self, function: Callable[[], Any], is_failure: Callable[[Any], bool] = lambda _: False) -> Any:
        """Run `function` through the breaker: `BreakerOpen` when refused; an exception or a result
        `is_failure` calls bad counts as a failure."""
        if not self.allow():
            raise BreakerOpen(self.name, self.retry_after_s())
        try:
            result = function()
        except BaseException:
            self.record(False)
            raise
        self.record(not is_failure(result))
        return result

    # --- inside the lock -----------------------------------------------------------------------------

    def _open(self, now: float, reason: str, repeat: bool = False) -> None:
        if repeat:
            self._open_for_s = min(self._open_for_s * 2, self.policy.max_open_for_s)
        self._opened_at = now
        self._probes_in_flight = 0
        self._probe_successes = 0
        self._move("open", reason)

    def _move(self, new: State, reason: str) -> None:
        old, self.state = self.state, new
        self.transitions += 1
        if self.on_transition is not None:
            self.on_transition(Transition(self.name, old, new, time.time(), reason))

    # --- figures -------------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            calls, failures = self._window.totals()
            return {
                "name": self.name,
                "state": self.state,
                "window_calls": calls,
                "window_failures": failures,
                "retry_after_s": round(self.retry_after_s(), 3),
                "transitions": self.transitions,
                "refused": self.refused,
            }


class BreakerOpen(Exception):
    """A call the breaker refused: the circuit is open (or its half-open probes are all in flight)."""

    def __init__(self, name: str, retry_after_s: float):
        super().__init__(f"circuit {name!r} is open; retry in {retry_after_s:.1f} s")
        self.name = name
        self.retry_after_s = retry_after_s


class Breakers:
    """Named breakers of one policy (one per target URL, say), created on first use."""

    def __init__(
        self, policy: BreakerPolicy | None = None, on_transition: Callable[[Transition], None] | None = None
    ):
        self.policy = policy or BreakerPolicy()
        self.on_transition = on_transition
        self._breakers: dict[str, CircuitBreaker] = {}
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> CircuitBreaker:
        breaker = self._breakers.get(name)
        if breaker is None:
            with self._lock:
                breaker = self._breakers.setdefault(
                    name, CircuitBreaker(name, self.policy, on_transition=self.on_transition)
                )
        return breaker

    def get(self, name: str) -> CircuitBreaker | None:
        """The breaker of `name` if a call has used it (no new one)."""
        return self._breakers.get(name)

    def to_json(self) -> list[dict[str, Any]]:
        return [breaker.to_json() for breaker in list(self._breakers.values())]


class RetryBudgetSpec(BaseModel):
    """How much retrying an upstream takes (YAML)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ratio: float = Field(default=0.2, ge=0, le=1, description="Retries per first attempt in the window")
    min_per_second: float = Field(default=3, ge=0, description="Retries always allowed, per second")
    window: DurationText = Field(default="10s", description="The rolling window the ratio is over")


class RetryBudget:
    """`try_retry()` is True while the retries of the window stay within `min_per_second * window +
    ratio * first attempts`; `request()` counts a first attempt. Thread-safe."""

    def __init__(self, spec: RetryBudgetSpec | None = None, clock: Callable[[], float] = time.monotonic):
        self.spec = spec or RetryBudgetSpec()
        self._window_s = duration_seconds(self.spec.window)
        self._counts = RollingCounts(self._window_s, 10, 2, clock)  # first attempts, retries
        self._lock = threading.Lock()
        self.exhausted = 0  # retries refused

    def request(self) -> None:
        with self._lock:
            self._counts.add(1, 0)

    def try_retry(self) -> bool:
        with self._lock:
            requests, retries = self._counts.totals()
            if retries + 1 > self.spec.min_per_second * self._window_s + self.spec.ratio * requests:
                self.exhausted += 1
                return False
            self._counts.add(0, 1)
            return True

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            requests, retries = self._counts.totals()
        return {"window_requests": requests, "window_retries": retries, "exhausted": self.exhausted}
