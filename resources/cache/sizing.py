"""Adaptive sizing of the memory layer: its byte bound moves between `memory.min_bytes` and
`memory.max_bytes` with what the last interval showed.

- **Grow** (by a quarter, to the max) while the layer evicts and its hit rate is below
  `target_hit_rate`: entries are pushed out that would have been read again.
- **Shrink** (to the bytes in use plus a quarter, to the min) while the hit rate meets the target, nothing
  was evicted and under 60% of the bound is used: memory held for nothing.
- Otherwise hold. An interval with fewer than `MIN_LOOKUPS` reads of the layer decides nothing.

Each decision is kept (the newest `KEPT_DECISIONS`) with its reason and figures, shown in the
namespace's analytics (`sizing`), so a bound that moved can be explained.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

MIN_LOOKUPS = 200
KEPT_DECISIONS = 20
GROW_FACTOR = 1.25
SHRINK_BELOW_USE = 0.6


@dataclass
class AdaptiveBound:
    min_bytes: int
    max_bytes: int
    target_hit_rate: float
    decisions: deque = field(default_factory=lambda: deque(maxlen=KEPT_DECISIONS))
    _last: tuple[int, int, int] = (0, 0, 0)  # memory hits, misses, evictions at the last decision

    def decide(self, memory: Any, hits: int, misses: int) -> int | None:
        """The new bound for `memory` (a MemoryLayer) from the counts since the last call, or None."""
        last_hits, last_misses, last_evictions = self._last
        window_hits, window_misses = hits - last_hits, misses - last_misses
        evicted = memory.evictions - last_evictions
        if window_hits + window_misses < MIN_LOOKUPS:
            return None
        self._last = (hits, misses, memory.evictions)
        hit_rate = window_hits / (window_hits + window_misses)
        bound, used = memory.byte_bound, memory.bytes
        if evicted and hit_rate < self.target_hit_rate and bound < self.max_bytes:
            new = min(self.max_bytes, int(bound * GROW_FACTOR))
            reason = f"{evicted} evicted at hit rate {hit_rate:.3f} < {self.target_hit_rate}"
        elif not evicted and hit_rate >= self.target_hit_rate and used < SHRINK_BELOW_USE * bound:
            new = max(self.min_bytes, int(used * GROW_FACTOR))
            reason = f"{used / bound:.0%} used, none evicted, hit rate {hit_rate:.3f}"
        else:
            return None
        if new == bound:
            return None
        self.decisions.append(
            {"at": round(time.time(), 3), "from_bytes": bound, "to_bytes": new, "reason": reason}
        )
        return new

    def to_json(self, memory: Any) -> dict[str, Any]:
        return {
            "bound_bytes": memory.byte_bound,
            "min_bytes": self.min_bytes,
            "max_bytes": self.max_bytes,
            "decisions": list(self.decisions),
        }
