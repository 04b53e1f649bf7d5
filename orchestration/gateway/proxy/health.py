"""Health of upstream targets, passive and active (Envoy's outlier detection and health checking).

- **Passive**: every answer a target gives counts. `consecutive_failures` 5xx answers, timeouts or
  connection errors in a row eject it for `eject_for`; each ejection that follows within
  `max_eject_for` of the last doubles that time, up to `max_eject_for`. When the time is up the target
  takes traffic again (its breaker may still hold it back).
- **Active**: one loop per proxy probes each target of an upstream declaring `health.active` every
  `interval` (`GET <target><path>`, `timeout`): `unhealthy` failures in a row take it out of
  rotation, `healthy` successes in a row bring it back.

A target out by either gets no traffic; with every target of an upstream out, the proxy answers 503
at once (problem+json, `Retry-After`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from orchestration.gateway.proxy.balancers import Target
from orchestration.gateway.proxy.config import ActiveHealthSpec, PassiveHealthSpec
from orchestration.kernel.times import duration_seconds

logger = logging.getLogger("junction.gateway.proxy")
TICK_S = 0.1  # how often the active loop looks for targets due a probe


def count_answer(target: Target, ok: bool, spec: PassiveHealthSpec | None, upstream: str) -> None:
    """Count one answer of `target` (ok: not a 5xx, a timeout or a connection error)."""
    if spec is None:
        return
    if ok:
        target.consecutive_failures = 0
        return
    target.consecutive_failures += 1
    if target.consecutive_failures < spec.consecutive_failures:
        return
    now = time.monotonic()
    ceiling = duration_seconds(spec.max_eject_for)
    if target.ejections and now - target.ejected_until > ceiling:
        target.ejections = 0  # long enough without trouble: the next ejection is short again
    target.ejections += 1
    duration = min(duration_seconds(spec.eject_for) * 2 ** (target.ejections - 1), ceiling)
    target.ejected_until = now + duration
    target.consecutive_failures = 0
    logger.warning(
        "upstream %s: target %s ejected for %g s (%d failures in a row; ejection %d)",
        upstream,
        target.url,
        duration,
        spec.consecutive_failures,
        target.ejections,
    )


def passes(spec: ActiveHealthSpec, status: int) -> bool:
    return status in spec.expect if spec.expect else 200 <= status < 400


def count_probe(target: Target, ok: bool, spec: ActiveHealthSpec, upstream: str) -> None:
    """Count one probe of `target`."""
    if ok:
        target.probes_passed, target.probes_failed = target.probes_passed + 1, 0
        if not target.healthy and target.probes_passed >= spec.healthy:
            target.healthy = True
            logger.warning("upstream %s: target %s healthy again", upstream, target.url)
    else:
        target.probes_failed, target.probes_passed = target.probes_failed + 1, 0
        if target.healthy and target.probes_failed >= spec.unhealthy:
            target.healthy = False
            logger.warning(
                "upstream %s: target %s unhealthy (%d probes failed in a row)",
                upstream,
                target.url,
                spec.unhealthy,
            )


class ActiveChecks:
    """The probing loop of one proxy: `run(config_of)` until cancelled."""

    def __init__(self) -> None:
        self._next_probe: dict[int, float] = {}  # id(target) -> monotonic seconds
        self.probes = 0

    async def run(self, config_of: Callable[[], Any]) -> None:
        import httpx

        client = None  # opened when an upstream first asks for probes (most gateways have none)
        try:
            while True:
                config = config_of()
                now = time.monotonic()
                due = []
                for upstream in config.upstreams.values():
                    spec = upstream.spec.health.active
                    if spec is None:
                        continue
                    if client is None:
                        client = httpx.AsyncClient(follow_redirects=False)
                    for target in upstream.targets:
                        if self._next_probe.get(id(target), 0.0) <= now:
                            self._next_probe[id(target)] = now + duration_seconds(spec.interval)
                            due.append(self._probe(client, upstream.name, target, spec))
                if due:
                    await asyncio.gather(*due)
                await asyncio.sleep(TICK_S)
        finally:
            if client is not None:
                await client.aclose()

    async def _probe(self, client: Any, upstream: str, target: Target, spec: ActiveHealthSpec) -> None:
        import httpx

        self.probes += 1
        try:
            response = await client.get(target.url + spec.path, timeout=duration_seconds(spec.timeout))
            ok = passes(spec, response.status_code)
        except httpx.HTTPError:
            ok = False
        count_probe(target, ok, spec, upstream)
