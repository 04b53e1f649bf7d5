"""Warming: load a namespace's most read keys again through its declared loader, so that the first
reads after a restart (or before a busy hour) are hits.

The keys come from `cache_key_hits` (sampled reads, `reporting.py`), most read first. A namespace
declares how to load one key:

```yaml
namespaces:
  lookups:
    warm:
      loader: mypackage.rates:load_rate   # key -> value
      top: 1000                           # how many of the most read keys
      match: "rate:*"                     # of those the loader knows (fnmatch pattern)
      schedule: "0 6 * * 1-5"             # a Dagster schedule of the warming asset (optional)
      on_start: true                      # warm when a process first opens the namespace
      concurrency: 8                      # keys loaded at once
```

`junction cache warm NAMESPACE [--top N]`, the `cache_warming__<namespace>` asset and `on_start` all
call `warm`. A key whose loader fails is counted and skipped; the others are still loaded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("junction.cache")
# Keys loaded before they are written together (one Redis pipeline, one transaction).
WRITE_BATCH = 500


class NothingToWarm(Exception):
    """The namespace declares no `warm` loader."""


@dataclass
class WarmResult:
    namespace: str
    candidates: int = 0  # keys the hit counts named
    loaded: int = 0
    failed: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)  # the first few, for the user

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def warm(
    cache: Any,
    top: int | None = None,
    loader: Callable[[str], Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
    *,
    keys: Iterable[str] | None = None,
    concurrency: int | None = None,
) -> WarmResult:
    """Load the `top` most read keys of `cache` (default: its `warm.top`), or the given `keys`,
    through `loader` (default: its `warm.loader`), `concurrency` at once (default: `warm.concurrency`),
    and store them in every layer in batches of WRITE_BATCH keys (`Cache.set_many`)."""
    from orchestration.kernel.imports import resolve_callable

    spec = cache.spec.warm
    if loader is None:
        if spec is None:
            raise NothingToWarm(
                f"cache namespace {cache.name!r} declares no warm loader (warm: {{loader: ...}})"
            )
        loader = resolve_callable(spec.loader)
    if concurrency is None:
        concurrency = spec.concurrency if spec is not None else 8
    started = time.perf_counter()
    if keys is None:
        keys = _most_read(cache, top or (spec.top if spec is not None else 1000))
    keys = list(keys)
    result = WarmResult(cache.name, candidates=len(keys))

    def load(key: str) -> tuple[Any, Exception | None]:
        try:
            return loader(key), None
        except Exception as exc:  # noqa: BLE001 - one key's loader failing does not stop the others
            return None, exc

    done = 0
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"cache-warm-{cache.name}") as pool:
        for start in range(0, len(keys), WRITE_BATCH):
            batch = keys[start : start + WRITE_BATCH]
            loaded: dict[str, Any] = {}
            for key, (value, failure) in zip(batch, pool.map(load, batch), strict=True):
                if failure is None:
                    loaded[key] = value
                else:
                    result.failed += 1
                    if len(result.errors) < 5:
                        result.errors.append(f"{key}: {failure}")
            cache.set_many(loaded)
            result.loaded += len(loaded)
            done += len(batch)
            if progress is not None:
                progress(done, len(keys))
    result.seconds = round(time.perf_counter() - started, 3)
    return result


def _most_read(cache: Any, limit: int) -> list[str]:
    from orchestration.store.db import get_engine
    from resources.cache.reporting import top_keys

    pattern = cache.spec.warm.match if cache.spec.warm is not None else "*"
    return [key for key, _ in top_keys(get_engine(cache.store_url), cache.name, limit, pattern)]
