"""Rate limits of proxy routes: four algorithms, per consumer, route or client address (combinable),
kept in this process or shared through Redis so that several gateways enforce one limit.

```yaml
routes:
  orders:
    rate_limits:
      - {algorithm: token_bucket, rate: 100, per: 1s, burst: 200, by: [consumer]}
      - {algorithm: sliding_window, rate: 1000, per: 1m, by: [ip], shared: true}
      - {algorithm: fixed_window, rate: 10000, per: 1h, by: [route]}
      - {algorithm: adaptive, rate: 500, per: 1s, min_rate: 50, latency_target: 250ms}
```

- `fixed_window` and `sliding_window`: the `limits` library (its fixed window, and its moving window:
  a log of each hit's time, so the sliding window is exact: never more than `rate` hits in any
  `per`, at the cost of memory growing with `rate`). Shared: `limits`' Redis storage (Lua).
- `token_bucket`: `rate` tokens per `per`, at most `burst` (default `rate`) saved up; written here (the
  `limits` library has no token bucket): a dict in memory, or one Lua script per request in Redis.
- `adaptive`: a token bucket whose rate moves by AIMD between `min_rate` and `rate`: each second, when
  the route's upstream answered slower than `latency_target` (its targets' latency EWMA) or failed
  more than `error_ratio` (its breakers' windows), the rate halves; otherwise it grows by a tenth of
  the range, back to `rate`. Always local: it follows what this gateway sees.

`by` names what one limit counts: `consumer` (the caller's principal; the client address on an open
route), `route`, `ip`; several together count each combination. A request over a limit gets 429
problem+json with `Retry-After`; every answer carries the IETF `RateLimit-Policy` and `RateLimit`
headers of the tightest limit. Redis unreachable: the shared limits fall back to this process's
(logged once a minute), so a Redis outage neither blocks traffic nor lifts every limit.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from orchestration.kernel.times import DurationText, duration_seconds

logger = logging.getLogger("junction.gateway.proxy")
Algorithm = Literal["token_bucket", "sliding_window", "fixed_window", "adaptive"]
Dimension = Literal["consumer", "route", "ip"]


class RateLimitSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    algorithm: Algorithm = "token_bucket"
    rate: int = Field(ge=1, description="Requests per `per` (adaptive: the most)")
    per: DurationText = "1s"
    burst: int | None = Field(default=None, ge=1, description="token_bucket: tokens saved up at most")
    by: tuple[Dimension, ...] = Field(default=("consumer",), min_length=1)
    shared: bool = Field(default=False, description="Counted in Redis: one limit over every gateway")
    min_rate: int | None = Field(default=None, ge=1, description="adaptive: the least it shrinks to")
    latency_target: DurationText = Field(default="500ms", description="adaptive: slower than this shrinks it")
    error_ratio: float = Field(default=0.1, gt=0, le=1, description="adaptive: more failures shrink it")

    @model_validator(mode="after")
    def _fits(self) -> RateLimitSpec:
        if self.burst is not None and self.algorithm != "token_bucket":
            raise ValueError("burst is for token_bucket")
        if self.algorithm == "adaptive":
            if self.shared:
                raise ValueError("adaptive limits follow this gateway's own view: they cannot be shared")
            if self.min_rate is not None and self.min_rate > self.rate:
                raise ValueError("min_rate is above rate")
        elif self.min_rate is not None:
            raise ValueError("min_rate is for adaptive")
        if len(set(self.by)) != len(self.by):
            raise ValueError("by: a dimension is named twice")
        return self

    @property
    def per_s(self) -> float:
        return duration_seconds(self.per)

    @property
    def name(self) -> str:
        """The policy's name in the RateLimit headers."""
        return f"{self.algorithm}-{'-'.join(self.by)}"


@dataclass
class Verdict:
    allowed: bool
    limit: int
    remaining: int
    reset_s: float  # until the window resets / a token is back
    policy: str
    window_s: float


class Limiter:
    """One declared limit of one route."""

    def __init__(self, route: str, spec: RateLimitSpec, redis_url: str | None):
        self.route = route
        self.spec = spec
        self.redis_url = redis_url if spec.shared else None
        self.rejected = 0
        self.fallbacks = 0  # shared limits counted locally while Redis was away
        self._last_warning = -60.0

    def key(self, consumer: str | None, ip: str | None) -> str:
        parts = []
        for dimension in self.spec.by:
            if dimension == "route":
                parts.append(f"route={self.route}")
            elif dimension == "consumer":
                parts.append(f"consumer={consumer}" if consumer else f"ip={ip}")
            else:
                parts.append(f"ip={ip}")
        return f"{self.route}|{self.spec.name}|" + "|".join(parts)

    async def check(self, key: str) -> Verdict:
        raise NotImplementedError

    def _degraded(self, exc: Exception) -> None:
        self.fallbacks += 1
        now = time.monotonic()
        if now - self._last_warning >= 60:
            self._last_warning = now
            logger.warning("rate limit of route %s: Redis unavailable, counting locally: %s", self.route, exc)


class WindowLimiter(Limiter):
    """fixed_window and sliding_window, on the `limits` library."""

    def __init__(self, route: str, spec: RateLimitSpec, redis_url: str | None):
        from limits import RateLimitItemPerSecond
        from limits.aio.storage import MemoryStorage
        from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter

        super().__init__(route, spec, redis_url)
        self.item = RateLimitItemPerSecond(spec.rate, max(1, round(spec.per_s)), namespace="junction-proxy")
        strategy = FixedWindowRateLimiter if spec.algorithm == "fixed_window" else MovingWindowRateLimiter
        self.local = strategy(MemoryStorage())
        self.shared = None
        if self.redis_url is not None:
            from limits.aio.storage import RedisStorage

            self.shared = strategy(RedisStorage(_limits_uri(self.redis_url), implementation="redispy"))

    async def check(self, key: str) -> Verdict:
        strategy = self.shared or self.local
        try:
            allowed = await strategy.hit(self.item, key)
            stats = await strategy.get_window_stats(self.item, key)
        except Exception as exc:  # noqa: BLE001 - Redis away: this process's count
            if self.shared is None:
                raise
            self._degraded(exc)
            allowed = await self.local.hit(self.item, key)
            stats = await self.local.get_window_stats(self.item, key)
        return Verdict(
            allowed,
            self.spec.rate,
            stats.remaining,
            max(0.0, stats.reset_time - time.time()),
            self.spec.name,
            self.spec.per_s,
        )


def _limits_uri(redis_url: str) -> str:
    return "async+" + redis_url if redis_url.startswith(("redis://", "rediss://")) else redis_url


# KEYS: the bucket; ARGV: rate per second, burst, now (s), cost. Returns {allowed, tokens left * 1000}.
_TAKE_TOKEN = """
local rate, burst, now, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(state[1]) or burst, tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local allowed = 0
if tokens >= cost then tokens = tokens - cost; allowed = 1 end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'at', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {allowed, math.floor(tokens * 1000)}
"""


class TokenBucket(Limiter):
    """token_bucket (and the bucket under adaptive): `rate / per` tokens a second, `burst` at most."""

    def __init__(self, route: str, spec: RateLimitSpec, redis_url: str | None):
        super().__init__(route, spec, redis_url)
        self.burst = spec.burst or spec.rate
        self.rate_per_s = spec.rate / spec.per_s
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._redis: Any = None

    def _take_locally(self, key: str, now: float) -> float | None:
        """Tokens left after taking one, or None when there was none."""
        tokens, at = self._buckets.get(key, (float(self.burst), now))
        tokens = min(self.burst, tokens + max(0.0, now - at) * self.rate_per_s)
        if tokens >= 1:
            self._buckets[key] = (tokens - 1, now)
            return tokens - 1
        self._buckets[key] = (tokens, now)
        return None

    async def _take_shared(self, key: str, now: float) -> float | None:
        if self._redis is None:
            import redis.asyncio as aredis

            self._redis = aredis.Redis.from_url(
                self.redis_url, socket_connect_timeout=0.5, socket_timeout=0.5
            )
            # EVALSHA (the script loaded once; redis-py loads it again after a NOSCRIPT), not EVAL
            # with the whole script on every request.
            self._take_token = self._redis.register_script(_TAKE_TOKEN)
        allowed, left = await self._take_token(
            keys=[f"junction:ratelimit:{key}"], args=[self.rate_per_s, self.burst, now, 1]
        )
        return left / 1000 if allowed else None

    async def check(self, key: str) -> Verdict:
        now = time.time()
        if self.redis_url is not None:
            try:
                left = await self._take_shared(key, now)
            except Exception as exc:  # noqa: BLE001 - Redis away: this process's bucket
                self._degraded(exc)
                left = self._take_locally(key, now)
        else:
            left = self._take_locally(key, now)
        if left is None:
            return Verdict(False, self.burst, 0, 1 / self.rate_per_s, self.spec.name, self.spec.per_s)
        missing = self.burst - left
        return Verdict(
            True, self.burst, int(left), missing / self.rate_per_s, self.spec.name, self.spec.per_s
        )

    async def aclose(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()


class AdaptiveLimiter(TokenBucket):
    """A token bucket whose rate AIMD moves from what the route's upstream does (see the module doc)."""

    ADJUST_EVERY_S = 1.0

    def __init__(self, route: str, spec: RateLimitSpec, redis_url: str | None, upstream: Any):
        super().__init__(route, spec, None)
        self.upstream = upstream
        self.max_rate_per_s = spec.rate / spec.per_s
        self.min_rate_per_s = (spec.min_rate or max(1, spec.rate // 10)) / spec.per_s
        self.latency_target_s = duration_seconds(spec.latency_target)
        self._adjusted_at = time.monotonic()
        self.decisions: list[dict[str, Any]] = []  # the newest few, for the analytics

    def health(self) -> tuple[float, float]:
        """(the slowest target's latency EWMA, the upstream's failure share in its breakers' windows)."""
        latency = max((target.ewma_s for target in self.upstream.targets), default=0.0)
        calls = failures = 0
        for target in self.upstream.targets:
            figures = target.breaker.to_json()
            calls += figures["window_calls"]
            failures += figures["window_failures"]
        return latency, (failures / calls if calls else 0.0)

    def adjust(self) -> None:
        now = time.monotonic()
        if now - self._adjusted_at < self.ADJUST_EVERY_S:
            return
        self._adjusted_at = now
        latency, failing = self.health()
        before = self.rate_per_s
        if latency > self.latency_target_s or failing > self.spec.error_ratio:
            self.rate_per_s = max(self.min_rate_per_s, self.rate_per_s / 2)
        else:
            step = (self.max_rate_per_s - self.min_rate_per_s) / 10
            self.rate_per_s = min(self.max_rate_per_s, self.rate_per_s + step)
        if not math.isclose(before, self.rate_per_s):
            self.decisions = [
                *self.decisions[-9:],
                {
                    "at": time.time(),
                    "rate_per_s": round(self.rate_per_s, 3),
                    "latency_ms": round(latency * 1000, 1),
                    "failing": round(failing, 3),
                },
            ]

    async def check(self, key: str) -> Verdict:
        self.adjust()
        return await super().check(key)


def open_limiter(route: str, spec: RateLimitSpec, redis_url: str | None, upstream: Any) -> Limiter:
    if spec.algorithm == "adaptive":
        return AdaptiveLimiter(route, spec, None, upstream)
    if spec.algorithm == "token_bucket":
        return TokenBucket(route, spec, redis_url)
    return WindowLimiter(route, spec, redis_url)


def ratelimit_headers(verdict: Verdict) -> list[tuple[bytes, bytes]]:
    """IETF draft-ietf-httpapi-ratelimit-headers: the policy and what is left of it."""
    policy = f'"{verdict.policy}";q={verdict.limit};w={max(1, round(verdict.window_s))}'
    state = f'"{verdict.policy}";r={max(0, verdict.remaining)};t={math.ceil(verdict.reset_s)}'
    return [(b"ratelimit-policy", policy.encode()), (b"ratelimit", state.encode())]
