"""Junction's multi-layer cache: memory → Redis → the platform store, one namespace per use.

`CacheResource` for Dagster code, `open_cache(namespace)` elsewhere, `@cached` for functions.
Namespaces are declared in `resources/caches.yaml` (`config.py`); the layers are in `layers.py`, the
read/write/stampede logic in `cache.py`, the values' encoding in `serializers.py`, HTTP answers with
revalidation in `http_answers.py`.

The names of `resource.py` (which imports Dagster) are loaded on first use, so that a spec model
importing `http_answers` or `config` (the ETL's, a CLI's) does not pay for Dagster.
"""

from typing import Any

from resources.cache.cache import Cache, CacheUnavailable
from resources.cache.config import NamespaceSpec, load_namespaces

_FROM_RESOURCE = ("CacheResource", "cached", "close_caches", "open_cache")

__all__ = ["Cache", "CacheUnavailable", "NamespaceSpec", "load_namespaces", *_FROM_RESOURCE]


def __getattr__(name: str) -> Any:
    if name in _FROM_RESOURCE:
        from resources.cache import resource

        return getattr(resource, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
