"""Sources: where a pipeline's records come from, read in batches of Arrow tables.

Every source implements `Source`: `read(quarantine)` yields `Batch`es (an Arrow table plus each row's
position in the source) and quarantines the records it cannot parse; `identity()` describes the input
(file paths with size and modification time or a content hash; a query with its parameters), so the
load slice can derive load ids from the input rather than from the run. SQL, REST and other assets'
outputs slot in behind the same two methods.

The sources live one family per module: `files` (CSV, JSON, JSON Lines, XML, Parquet), `tables`
(Arrow tables, SQL, other pipelines' assets) and `rest` (HTTP APIs, with `paginators` and `auth`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from assets.etl.sources.base import READ_STEP, InputIdentity, Source
from assets.etl.sources.files import FileSource
from assets.etl.sources.tables import (
    ArrowTableSource,
    AssetSource,
    SqlSource,
    published_pipeline,
    resolve_sqlite_url,
)
from assets.etl.spec import AssetSourceSpec, FileSourceSpec, LoadedPipeline, RestSourceSpec, SqlSourceSpec
from assets.etl.state import IncrementalWindow

__all__ = [
    "READ_STEP",
    "ArrowTableSource",
    "AssetSource",
    "FileSource",
    "InputIdentity",
    "Source",
    "SqlSource",
    "open_source",
    "published_pipeline",
    "resolve_sqlite_url",
]


def open_source(
    spec: FileSourceSpec | SqlSourceSpec | AssetSourceSpec | RestSourceSpec,
    base_dir: Path,
    batch_size: int,
    upstream: Mapping[str, LoadedPipeline] | None = None,
    window: IncrementalWindow | None = None,
) -> Source:
    """The `Source` for a spec's `source:` section (or an enrich lookup); relative file paths resolve
    against `base_dir`, other pipelines' assets through `upstream` (`LoadedPipeline.upstream`). An
    incremental `window` narrows what SQL and REST sources ask for."""
    if isinstance(spec, FileSourceSpec):
        return FileSource(spec, base_dir, batch_size)
    if isinstance(spec, AssetSourceSpec):
        return AssetSource(published_pipeline(spec, upstream), batch_size)
    if isinstance(spec, RestSourceSpec):
        from assets.etl.sources.rest import RestSource

        return RestSource(spec, batch_size, window, upstream)
    return SqlSource(spec, batch_size, base_dir, window)
