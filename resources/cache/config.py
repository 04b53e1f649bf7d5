"""Cache namespaces as declared in `resources/caches.yaml` (setting `JUNCTION_CACHES_FILE`).

Each use of the cache has its own namespace and so its own policy and figures:

```yaml
namespaces:
  lookups:
    layers: [memory, redis, database]   # read in this order, filled back on a miss
    ttl: 1h                             # how long a value is fresh
    stale_grace: 10m                    # then served stale while one caller refreshes it
    memory: {max_entries: 10000, max_bytes: 64MB}
    compress_over_bytes: 1024           # zstandard above this size
    serializer: json                    # json (orjson) or msgpack; never pickle
    version: 1                          # bump when the values' shape changes: old entries are misses
    write_behind:                       # optional: `set` queues the write, a flusher applies it
      stream: cache.profiles.writes     # a declared event stream: the durable queue
      writer: mypackage.profiles:save   # applies a batch of QueuedWrite to the origin
```

A file that is missing declares only the `default` namespace; a bad file fails with every problem in
the kernel's format (`caches.yaml: namespaces.lookups.ttl: ...`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from orchestration.kernel.spec_errors import read_yaml, validate_spec
from orchestration.kernel.times import DurationText, duration_seconds
from resources.cache.topology import RedisTopologySpec

Layer = Literal["memory", "redis", "database"]
LAYER_ORDER: tuple[Layer, ...] = ("memory", "redis", "database")
NAMESPACE_PATTERN = r"^[a-z][a-z0-9_]*$"
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|MB|GB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {None: 1, "b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3}


def parse_size(value: int | str) -> int:
    """`64MB` -> 67108864; an int is bytes."""
    if isinstance(value, int):
        return value
    match = _SIZE.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a size (bytes, or 512KB, 64MB, 1GB)")
    return int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower() or None]


def _check_size(value: int | str) -> int | str:
    parse_size(value)
    return value


Size = Annotated[int | str, AfterValidator(_check_size)]


class MemoryLayerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_entries: int = Field(default=10_000, ge=1, description="Entries kept in the process")
    max_bytes: Size = Field(default="64MB", description="Bytes of encoded values kept in the process")
    max_value_bytes: Size = Field(
        default="1MB", description="A larger value is not kept in memory (it goes to the layers below)"
    )
    min_bytes: Size | None = Field(
        default=None,
        description="Adaptive sizing: the byte bound moves between this and max_bytes with the hit rate "
        "and evictions (unset: fixed at max_bytes)",
    )
    target_hit_rate: float = Field(
        default=0.95, gt=0, le=1, description="Adaptive sizing grows the memory layer while below this"
    )

    @model_validator(mode="after")
    def _min_below_max(self) -> MemoryLayerSpec:
        if self.min_bytes is not None and parse_size(self.min_bytes) > parse_size(self.max_bytes):
            raise ValueError("min_bytes: must not exceed max_bytes")
        return self


class WriteBehindSpec(BaseModel):
    """Writes acknowledged once queued on an event stream, applied to the origin by one flusher."""

    model_config = ConfigDict(extra="forbid")

    stream: str = Field(description="A declared event stream (sensors/streams/) holding the queued writes")
    writer: str = Field(
        description="`package.module:function` applying a batch of writes (list[QueuedWrite]) to the origin"
    )
    batch_size: int = Field(default=500, ge=1, le=10_000, description="Writes per call of the writer")
    flush_interval: DurationText = Field(default="1s", description="How often the flusher looks for writes")
    background: bool = Field(
        default=True,
        description="Flush from a thread of every process that opens the namespace (false: only where "
        "`junction cache flush` runs)",
    )
    lease: DurationText = Field(
        default="10s",
        description="How long a flusher's turn lasts unrenewed: a killed flusher's queue is taken over after it",
    )

    @property
    def flush_interval_s(self) -> float:
        return duration_seconds(self.flush_interval)

    @property
    def lease_s(self) -> float:
        return duration_seconds(self.lease)


class WarmSpec(BaseModel):
    """Warming: the most read keys (sampled, `cache_key_hits`) loaded again through `loader`."""

    model_config = ConfigDict(extra="forbid")

    loader: str = Field(description="`package.module:function` returning the value of one key")
    top: int = Field(default=1000, ge=1, le=1_000_000, description="How many of the most read keys")
    match: str = Field(
        default="*", description="Only keys matching this pattern (`airport:*`; fnmatch) are the loader's"
    )
    schedule: str | None = Field(
        default=None, description="Cron: warm before this time (a Dagster schedule of the warming asset)"
    )
    on_start: bool = Field(
        default=False, description="Warm in the background when a process first opens the namespace"
    )
    concurrency: int = Field(
        default=8, ge=1, le=256, description="Keys loaded at once (loaders mostly wait on I/O)"
    )

    @model_validator(mode="after")
    def _cron(self) -> WarmSpec:
        if self.schedule is not None:
            from dagster._utils.schedules import is_valid_cron_string

            if not is_valid_cron_string(self.schedule):
                raise ValueError(f"schedule: {self.schedule!r} is not a cron expression")
        return self


class NamespaceSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    layers: list[Layer] = Field(default_factory=lambda: list(LAYER_ORDER), min_length=1)
    ttl: DurationText = Field(default="1h", description="How long a value is fresh")
    stale_grace: DurationText | None = Field(
        default=None, description="After the ttl, a stale value is served while one caller refreshes it"
    )
    memory: MemoryLayerSpec = Field(default_factory=MemoryLayerSpec)
    compress_over_bytes: int | None = Field(
        default=1024, ge=0, description="zstandard-compress encoded values larger than this (null: never)"
    )
    serializer: Literal["json", "msgpack"] = "json"
    version: int = Field(default=1, ge=1, description="Part of every key: bump it to drop old entries")
    lock_timeout: DurationText = Field(
        default="30s",
        description="How long other processes wait for the one loading a cold key (a crashed holder "
        "blocks nobody longer)",
    )
    require_l2: bool = Field(
        default=False, description="Fail calls while Redis is down (default: degrade to the other layers)"
    )
    write_behind: WriteBehindSpec | None = Field(
        default=None, description="Queue writes for the origin instead of writing it in the caller"
    )
    early_refresh: float | None = Field(
        default=None,
        gt=0,
        le=10,
        description="Probabilistic early refresh (XFetch's beta, 1 is usual): a fresh value is reloaded in "
        "the background shortly before its ttl ends, more likely the closer and the slower its loader",
    )
    warm: WarmSpec | None = Field(default=None, description="Preload the most read keys through a loader")

    @model_validator(mode="after")
    def _layers_in_order(self) -> NamespaceSpec:
        if len(set(self.layers)) != len(self.layers):
            raise ValueError("layers: each layer at most once")
        if self.layers != sorted(self.layers, key=LAYER_ORDER.index):
            raise ValueError(f"layers: read from the fastest down, in the order {', '.join(LAYER_ORDER)}")
        if self.require_l2 and "redis" not in self.layers:
            raise ValueError("require_l2 needs the redis layer")
        return self

    @property
    def ttl_s(self) -> float:
        return duration_seconds(self.ttl)

    @property
    def stale_grace_s(self) -> float:
        return duration_seconds(self.stale_grace) if self.stale_grace else 0.0

    @property
    def lock_timeout_s(self) -> float:
        return duration_seconds(self.lock_timeout)


class CachesFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    SPEC_SHAPE: ClassVar[str] = (
        "a caches file is a mapping: namespaces: {name: {layers: [...], ttl: ...}}, and optionally "
        "redis: {mode: single|cluster|ring, urls: [...]}"
    )

    redis: RedisTopologySpec = Field(default_factory=RedisTopologySpec)

    namespaces: dict[Annotated[str, Field(pattern=NAMESPACE_PATTERN)], NamespaceSpec] = Field(
        default_factory=dict
    )


DEFAULT_NAMESPACE = "default"


def load_caches_file(path: str | Path | None = None) -> CachesFile:
    """`path` (default: the setting) validated, with `default` among its namespaces unless declared."""
    if path is None:
        from orchestration.settings import get_settings

        path = get_settings().caches_file
    path = Path(path)
    caches = validate_spec(read_yaml(path) or {}, CachesFile, path) if path.exists() else CachesFile()
    caches.namespaces = {DEFAULT_NAMESPACE: NamespaceSpec(), **caches.namespaces}
    return caches


def load_namespaces(path: str | Path | None = None) -> dict[str, NamespaceSpec]:
    """The namespaces of `path` (default: the setting), plus `default` unless the file declares it."""
    return load_caches_file(path).namespaces
