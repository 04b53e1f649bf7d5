"""Per-namespace, per-layer figures: kept in the process, cheap to update (a counter and, for reads, a
bounded reservoir of latencies for p50/p99)."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

# Latencies kept per layer for the percentiles: the newest ones.
RESERVOIR = 4096


def _percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@dataclass
class LayerStats:
    hits: int = 0
    misses: int = 0
    sets: int = 0
    refused: int = 0  # a value the layer would not keep (too large for memory)
    corrupt: int = 0
    errors: int = 0  # the layer did not answer (degraded)
    hit_seconds: deque = field(default_factory=lambda: deque(maxlen=RESERVOIR))

    def to_json(self) -> dict[str, Any]:
        lookups = self.hits + self.misses
        seconds = list(self.hit_seconds)
        p50, p99 = _percentile(seconds, 0.5), _percentile(seconds, 0.99)
        return {
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": round(self.hits / lookups, 4) if lookups else None,
            "sets": self.sets,
            "refused": self.refused,
            "corrupt": self.corrupt,
            "errors": self.errors,
            "hit_p50_us": round(p50 * 1e6, 1) if p50 is not None else None,
            "hit_p99_us": round(p99 * 1e6, 1) if p99 is not None else None,
        }


@dataclass
class NamespaceStats:
    layers: dict[str, LayerStats]
    gets: int = 0
    hits: int = 0
    stale_served: int = 0
    early_refreshes: int = 0
    loader_calls: int = 0
    loader_seconds: float = 0.0
    lock_waits: int = 0
    raw_bytes: int = 0  # of values encoded, before compression
    stored_bytes: int = 0  # after it
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def for_layers(cls, names: list[str]) -> NamespaceStats:
        return cls({name: LayerStats() for name in names})

    def add(self, **counts: float) -> None:
        with self._lock:
            for name, amount in counts.items():
                setattr(self, name, getattr(self, name) + amount)

    def to_json(self) -> dict[str, Any]:
        return {
            "gets": self.gets,
            "hits": self.hits,
            "hit_rate": round(self.hits / self.gets, 4) if self.gets else None,
            "stale_served": self.stale_served,
            "early_refreshes": self.early_refreshes,
            "loader_calls": self.loader_calls,
            "loader_seconds": round(self.loader_seconds, 4),
            "lock_waits": self.lock_waits,
            "raw_bytes": self.raw_bytes,
            "stored_bytes": self.stored_bytes,
            "compression_ratio": round(self.raw_bytes / self.stored_bytes, 2) if self.stored_bytes else None,
            "layers": {name: layer.to_json() for name, layer in self.layers.items()},
        }
