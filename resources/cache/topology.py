"""Where the cache's Redis layer lives: one server, a Redis Cluster, or a ring of independent servers.

Declared at the top of `caches.yaml` (every namespace shares it):

```yaml
redis:
  mode: cluster                         # single (default) | cluster | ring
  urls_env: JUNCTION_CACHE_REDIS_URLS   # comma-separated URLs, read from this variable (secrets stay
                                        # out of files); or `urls: [...]` for URLs without passwords
```

- `single`: the server of JUNCTION_REDIS_URL (or the resource's `redis_url`).
- `cluster`: a Redis Cluster through redis-py's cluster client, started from any of the URLs. The
  client routes every key to its hash slot. The one script with two keys (an entry and its load
  lock) finds both on one slot: the lock's name carries the entry's `{hash tag}`, the cache key
  itself, so keys still spread over every slot; a multi-key DEL is split by slot by the client.
  PUBLISH reaches every node of a cluster, so invalidations work as on one server. Cluster pipelines
  run no scripts, so there a load's write and its lock release are two round trips.
- `ring`: independent servers (no cluster mode), each key on one of them by consistent hashing
  (uhashring's ketama ring): adding a fifth server moves about a fifth of the keys, not all of them.
  A tag's set lives on the server its own name hashes to; a load lock on its entry's server. Invalidations are published on the first
  URL's server, which every process of the same configuration listens to.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Mode = Literal["single", "cluster", "ring"]


class RedisTopologySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Mode = "single"
    urls: list[str] = Field(default_factory=list, description="Servers (cluster: any of its nodes)")
    urls_env: str | None = Field(
        default=None, description="Environment variable holding comma-separated URLs (with passwords)"
    )

    @model_validator(mode="after")
    def _urls_for_several(self) -> RedisTopologySpec:
        if self.mode != "single" and not self.urls and not self.urls_env:
            raise ValueError(f"mode {self.mode} needs urls or urls_env")
        for url in self.urls:
            if not url.startswith(("redis://", "rediss://")):
                raise ValueError(f"urls: {url!r} must start with redis:// or rediss://")
        return self

    def resolved_urls(self, single_url: str | None) -> list[str]:
        """The servers to connect to ([] when there is no Redis: the layer is left out)."""
        if self.mode == "single" and not self.urls and not self.urls_env:
            return [single_url] if single_url else []
        urls = list(self.urls)
        if self.urls_env:
            value = os.environ.get(self.urls_env, "")
            urls += [url.strip() for url in value.split(",") if url.strip()]
        return urls


def _client(url: str) -> Any:
    import redis

    # Short timeouts: a Redis that does not answer must degrade the cache, not hang its callers.
    return redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=1.0, health_check_interval=30)


@dataclass
class RedisTopology:
    """The clients of the cache's Redis layer and which one holds a given Redis key."""

    mode: Mode
    urls: list[str]
    clients: list[Any]
    bus: Any  # where invalidations are published and listened to
    ring: Any = None  # uhashring.HashRing over the client indexes (ring mode)

    @classmethod
    def connect(cls, spec: RedisTopologySpec, single_url: str | None) -> RedisTopology | None:
        urls = spec.resolved_urls(single_url)
        if not urls:
            return None
        if spec.mode == "cluster":
            from redis.cluster import ClusterNode, RedisCluster
            from redis.connection import parse_url

            nodes = []
            for url in urls:
                parts = parse_url(url)
                nodes.append(ClusterNode(parts.get("host", "127.0.0.1"), parts.get("port", 6379)))
            first = parse_url(urls[0])
            cluster = RedisCluster(
                startup_nodes=nodes,
                password=first.get("password"),
                username=first.get("username"),
                socket_connect_timeout=0.5,
                socket_timeout=1.0,
            )
            return cls("cluster", urls, [cluster], cluster)
        clients = [_client(url) for url in urls]
        if spec.mode == "ring":
            from uhashring import HashRing

            ring = HashRing(nodes=[str(index) for index in range(len(clients))], hash_fn="ketama")
            return cls("ring", urls, clients, clients[0], ring)
        return cls("single", urls, clients, clients[0])

    @property
    def identity(self) -> str:
        """Equal for processes sharing these servers (the invalidation listener is one per identity)."""
        return f"{self.mode}:{','.join(self.urls)}"

    def client_for(self, name: str) -> Any:
        """The client holding the Redis key `name`."""
        if self.ring is None:
            return self.clients[0]
        return self.clients[int(self.ring.get_node(name))]

    def group_by_client(self, names: Iterable[str]) -> list[tuple[Any, list[str]]]:
        if self.ring is None:
            names = list(names)
            return [(self.clients[0], names)] if names else []
        groups: dict[int, list[str]] = {}
        for name in names:
            groups.setdefault(int(self.ring.get_node(name)), []).append(name)
        return [(self.clients[index], group) for index, group in groups.items()]

    def close(self) -> None:
        for client in self.clients:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing what may already be gone
                pass
