"""Sources over tables: an Arrow table in memory, a SQL table or query, another pipeline's published
output.

`AssetSource` reads another pipeline's published output where that pipeline published it: a SQL
target streamed like a SQL source, a Parquet target in row batches, a CSV target like a CSV source
(columns as strings: cast them). The publisher's load id column is dropped. Its identity is the
file's (path, size, mtime) or, for a table, the load ids the table holds, so re-running on an
unchanged upstream gives the same load id and a new publish gives a new one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa

from assets.etl.quarantine import Batch, Quarantine
from assets.etl.sources.base import InputIdentity, Source
from assets.etl.sources.files import FileSource
from assets.etl.spec import (
    AssetSourceSpec,
    FileSourceSpec,
    LoadedPipeline,
    SqlSourceSpec,
    SqlTargetSpec,
    load_pipelines,
)
from assets.etl.state import IncrementalWindow
from orchestration.errors import ConfigurationError, JunctionError


class ArrowTableSource(Source):
    """An Arrow table already in memory as a source (an analyst's data, tests); identity = content hash."""

    def __init__(self, table: pa.Table, name: str = "table", batch_size: int = 50_000):
        self.table = table
        self.name = name
        self.batch_size = batch_size

    @property
    def description(self) -> str:
        return self.name

    def identity(self) -> InputIdentity:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, self.table.schema) as writer:
            writer.write_table(self.table)
        return InputIdentity("arrow", ((self.name, hashlib.sha256(sink.getvalue()).hexdigest()),))

    def read(self, quarantine: Quarantine) -> Iterator[Batch]:
        for start in range(0, self.table.num_rows, self.batch_size):
            piece = self.table.slice(start, self.batch_size)
            yield Batch.from_table(piece, self.name, first_row=start + 1)


# --- SQL ----------------------------------------------------------------------------------------------


def resolve_sqlite_url(url: str, base_dir: Path | None) -> str:
    """A relative SQLite database path in `url` made absolute against `base_dir`, as relative file
    paths are (a source's against its spec's folder, a target's against $JUNCTION_HOME); any other URL
    (another database, ``:memory:``, an absolute path, a ``file:`` URI) is returned as it is."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    database = parsed.database or ""
    if (
        base_dir is None
        or parsed.get_backend_name() != "sqlite"
        or database in ("", ":memory:")
        or database.startswith("file:")
        or Path(database).is_absolute()
    ):
        return url
    return parsed.set(database=str(Path(base_dir) / database)).render_as_string(hide_password=False)


class SqlSource(Source):
    """A table or parameterized query through SQLAlchemy, streamed with a server-side cursor.

    `stream_results` makes PostgreSQL (psycopg2) use a named cursor and SQLite step through its
    cursor, so memory is bounded by `batch_size` rows whatever the result's size.
    """

    def __init__(
        self,
        spec: SqlSourceSpec,
        batch_size: int,
        base_dir: Path | None = None,
        window: IncrementalWindow | None = None,
    ):
        """With an incremental `window`, a table is read from the window's start (a WHERE on the
        cursor, ordered by it); a query gets the bound parameters `incremental_start` and
        `incremental_end` to use."""
        self.spec = spec
        self.batch_size = batch_size
        self.base_dir = base_dir
        self.window = window
        self.read_at = datetime.now(UTC)

    @property
    def description(self) -> str:
        return f"table {self.spec.table}" if self.spec.table else "query"

    def url(self) -> str:
        if self.spec.url is not None:
            return resolve_sqlite_url(self.spec.url, self.base_dir)
        value = os.environ.get(self.spec.url_env or "")
        if not value:
            raise ConfigurationError(
                f"environment variable {self.spec.url_env} (the source's url_env) is not set"
            )
        return resolve_sqlite_url(value, self.base_dir)

    def identity(self) -> InputIdentity:
        from sqlalchemy.engine import make_url

        url = make_url(self.url()).render_as_string(hide_password=True)
        what = self.spec.table or self.spec.query or ""
        parts = (url, what, json.dumps(self.spec.params, sort_keys=True, default=str))
        if self.window is not None:
            # A range of a table that keeps changing: this read, at this moment, from this start.
            parts = (*parts, str(self.window.template_values()["start"]), self.read_at.isoformat())
        return InputIdentity("sql", (parts,))

    def _params(self) -> dict[str, Any]:
        if self.window is None:
            return dict(self.spec.params)
        start, end = self.window.start, self.window.end
        if self.spec.table is not None and self.window.spec.kind == "time":
            from sqlalchemy.engine import make_url

            # A day of slack each side: a table's times may be naive (read in the session's zone) or,
            # on SQLite, text in any ISO layout, compared as text; a date compares right with all of
            # them. The exact range is applied to the records read (`state.IncrementalStep`).
            start -= timedelta(days=1)
            end = None if end is None else end + timedelta(days=1)
            if make_url(self.url()).get_backend_name() == "sqlite":
                start, end = start.date().isoformat(), None if end is None else end.date().isoformat()
        return {**self.spec.params, "incremental_start": start, "incremental_end": end}

    def _statement(self) -> Any:
        import sqlalchemy as sa

        if self.spec.query is not None:
            return sa.text(self.spec.query)
        schema, _, name = (self.spec.table or "").rpartition(".")
        statement = sa.select(sa.text("*")).select_from(sa.table(name, schema=schema or None))
        if self.window is not None:
            cursor = sa.column(self.window.spec.cursor)
            start = sa.bindparam("incremental_start")
            strict = self.window.strict and self.window.spec.kind == "number"
            statement = statement.where(cursor > start if strict else cursor >= start)
            if self.window.end is not None:
                statement = statement.where(cursor < sa.bindparam("incremental_end"))
            statement = statement.order_by(cursor)
        return statement

    def read(self, quarantine: Quarantine) -> Iterator[Batch]:
        import sqlalchemy as sa

        engine = sa.create_engine(self.url())
        next_row = 1
        try:
            with engine.connect() as connection:
                result = connection.execution_options(
                    stream_results=True, max_row_buffer=self.batch_size
                ).execute(self._statement(), self._params())
                names = list(result.keys())
                for rows in result.partitions(self.batch_size):
                    columns = list(zip(*rows, strict=True)) if rows else [() for _ in names]
                    table = pa.table(
                        {name: pa.array(column) for name, column in zip(names, columns, strict=True)}
                    )
                    yield Batch.from_table(table, self.description, first_row=next_row)
                    next_row += table.num_rows
        except sa.exc.SQLAlchemyError as exc:
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            raise JunctionError(f"cannot read {self.description}: {reason}") from None
        except (pa.ArrowException, TypeError) as exc:
            raise JunctionError(f"cannot read {self.description} as Arrow: {exc}") from None
        finally:
            engine.dispose()


# --- other pipelines' published assets ----------------------------------------------------------------


class AssetSource(Source):
    """Another pipeline's published output, read in chunks from where that pipeline published it."""

    def __init__(self, upstream: LoadedPipeline, batch_size: int):
        # Imported here: `loads` resolves SQLite URLs with this module, so this module cannot import it first.
        from assets.etl.loads import FileTarget, target_base_dir

        target = upstream.spec.target
        if target is None:
            raise ConfigurationError(
                f"pipeline {upstream.name!r} has no target: it publishes nothing to read"
            )
        self.upstream = upstream
        self.inner: FileSource | SqlSource
        self.path: Path | None = None
        if isinstance(target, SqlTargetSpec):
            self.table = target.table
            self.inner = SqlSource(
                SqlSourceSpec(kind="sql", url=target.url, url_env=target.url_env, table=target.table),
                batch_size,
                target_base_dir(),  # a relative SQLite target lives where the upstream published it
            )
        else:
            self.path = FileTarget(target, target_base_dir()).path
            self.inner = FileSource(
                FileSourceSpec(format=target.format, path=str(self.path)), self.path.parent, batch_size
            )

    @property
    def description(self) -> str:
        return f"asset {self.upstream.name}"

    def _not_published(self, where: str) -> JunctionError:
        return JunctionError(
            f"pipeline {self.upstream.name!r} has not published yet ({where} does not exist): "
            f"materialize the asset {self.upstream.name} first"
        )

    def identity(self) -> InputIdentity:
        if self.path is not None:
            if not self.path.exists():
                raise self._not_published(str(self.path))
            return InputIdentity("asset", ((self.upstream.name,), *self.inner.identity().parts))
        return InputIdentity("asset", ((self.upstream.name,), *self.inner.identity().parts, self._load_ids()))

    def _load_ids(self) -> tuple[str, ...]:
        """The load ids the published table holds: they change with every publish that changes it."""
        import sqlalchemy as sa

        from assets.etl.loads import LOAD_ID_COLUMN

        assert isinstance(self.inner, SqlSource)
        engine = sa.create_engine(self.inner.url())
        quote = engine.dialect.identifier_preparer.quote
        schema, _, name = self.table.rpartition(".")
        qualified = f"{quote(schema)}.{quote(name)}" if schema else quote(name)
        try:
            with engine.connect() as connection:
                if not sa.inspect(connection).has_table(name, schema=schema or None):
                    raise self._not_published(f"table {self.table}")
                columns = {
                    column["name"] for column in sa.inspect(connection).get_columns(name, schema or None)
                }
                if LOAD_ID_COLUMN not in columns:
                    return ()
                ids = connection.execute(sa.text(f"SELECT DISTINCT {quote(LOAD_ID_COLUMN)} FROM {qualified}"))
                return tuple(sorted(str(value) for value in ids.scalars()))
        finally:
            engine.dispose()

    def read(self, quarantine: Quarantine) -> Iterator[Batch]:
        if self.path is not None and not self.path.exists():
            raise self._not_published(str(self.path))
        if self.path is None:
            self._load_ids()  # a clear error when the table was never published
        from assets.etl.loads import LOAD_ID_COLUMN

        for batch in self.inner.read(quarantine):
            table = batch.table
            if LOAD_ID_COLUMN in table.column_names:
                table = table.drop_columns([LOAD_ID_COLUMN])
            yield Batch(table, self.description, batch.lines, batch.rows)


def published_pipeline(
    spec: AssetSourceSpec, upstream: Mapping[str, LoadedPipeline] | None
) -> LoadedPipeline:
    """The pipeline an asset source names: from the loader's `upstream`, else from the spec folder
    (an analyst's spec built in Python)."""
    name = spec.pipeline or spec.asset or ""
    if upstream is not None and name in upstream:
        return upstream[name]
    pipelines = load_pipelines()
    if name not in pipelines:
        raise ConfigurationError(f"no pipeline named {name!r} publishes an asset to read")
    return pipelines[name]
