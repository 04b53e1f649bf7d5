"""Junction's multi-layer cache: memory → Redis → the platform store, one namespace per use.

`CacheResource` for Dagster code, `open_cache(namespace)` elsewhere, `@cached` for functions.
Namespaces are declared in `resources/caches.yaml` (`config.py`); the layers are in `layers.py`, the
read/write/stampede logic in `cache.py`, the values' encoding in `serializers.py`.
"""

from resources.cache.cache import Cache, CacheUnavailable
from resources.cache.config import NamespaceSpec, load_namespaces
from resources.cache.resource import CacheResource, cached, close_caches, open_cache

__all__ = [
    "Cache",
    "CacheResource",
    "CacheUnavailable",
    "NamespaceSpec",
    "cached",
    "close_caches",
    "load_namespaces",
    "open_cache",
]
