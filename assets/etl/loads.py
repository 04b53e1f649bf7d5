"""Loads: write-audit-publish into SQL tables (PostgreSQL, SQLite) and files (Parquet, CSV).

A load happens in two steps, one per Dagster asset:

1. `Target.stage(table, load_id)` writes the run's clean rows to a staging place next to the target
   (the table ``<table>_staged``, or the file ``<target>.staged.parquet``), replacing what an earlier
   run left there. Every staged row carries the run's load id in `LOAD_ID_COLUMN`.
2. `Target.publish(mode, keys)` moves the staged rows into the target in one transaction and consumes
   the staging place:

   - ``replace``: the staging table is swapped into place (drop + rename), the staged file renamed;
   - ``append``: skipped when the target already holds the staged load id (re-running the same input
     does not duplicate), else the staged rows are inserted;
   - ``merge``: ``INSERT … ON CONFLICT (keys) DO UPDATE`` (a unique index on the keys is created if
     missing); the staged rows must be unique by key (a ``dedupe`` step does that).

When a blocking check fails, step 2 never runs: the target stays exactly as it was and the staged
rows stay where they are, for inspection. Quarantined records go next to the target
(``<table>_quarantine`` or ``<stem>_quarantine.parquet``) with the load id and run id; re-running
the same input replaces that input's quarantine rather than adding to it.

Bulk paths: PostgreSQL's staging table gets the rows by binary COPY straight from Arrow (the ADBC
PostgreSQL driver) when every column has a binary form equal to its SQL type (integers but int8,
float64, text, booleans, dates, timestamps to the microsecond), else - and for the quarantine -
through ``COPY … FROM STDIN (FORMAT csv)`` (psycopg2 `copy_expert`) from an in-memory CSV written by
Arrow; SQLite through `executemany`. File targets
are read back and rewritten whole for append and merge (Arrow, in memory), then written to a temp
file in the target's folder and renamed over the target (atomic on one file system).
"""

from __future__ import annotations

import io
import os
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from assets.etl.quarantine import Quarantine
from assets.etl.spec import FileTargetSpec, SqlTargetSpec
from orchestration.errors import ConfigurationError, JunctionError

__all__ = [
    "LOAD_ID_COLUMN",
    "FileTarget",
    "PublishOutcome",
    "SqlTarget",
    "Target",
    "open_target",
]

LOAD_ID_COLUMN = "_junction_load_id"
RUN_ID_COLUMN = "_junction_run_id"


@dataclass(frozen=True)
class PublishOutcome:
    """What publishing did: rows written into the target, and its size afterwards."""

    rows_published: int
    target_rows: int
    skipped_reason: str | None = None


def with_load_id(table: pa.Table, load_id: str) -> pa.Table:
    if LOAD_ID_COLUMN in table.column_names:
        table = table.drop_columns([LOAD_ID_COLUMN])
    return table.append_column(LOAD_ID_COLUMN, pa.repeat(pa.scalar(load_id, pa.string()), table.num_rows))


def quarantine_table(quarantine: Quarantine, load_id: str, run_id: str) -> pa.Table:
    table = with_load_id(quarantine.to_table(), load_id)
    return table.append_column(RUN_ID_COLUMN, pa.repeat(pa.scalar(run_id, pa.string()), table.num_rows))


class Target(ABC):
    """Where a pipeline's rows end up; `description` names it in messages and metadata."""

    description: str
    kind: str

    @abstractmethod
    def dispose(self) -> None:
        """Release connections."""

    @abstractmethod
    def stage(self, table: pa.Table, load_id: str) -> None: ...

    @abstractmethod
    def publish(self, mode: str, keys: list[str]) -> PublishOutcome: ...

    @abstractmethod
    def write_quarantine(self, quarantine: Quarantine, load_id: str, run_id: str) -> None: ...

    @abstractmethod
    def read(self) -> pa.Table:
        """The target's rows (tests and reports; small targets)."""

    @abstractmethod
    def read_staged(self) -> pa.Table | None:
        """The staged rows, or None when nothing is staged."""


# --- SQL ----------------------------------------------------------------------------------------------


def _sql_type(data_type: pa.DataType, dialect: str) -> str:
    postgres = dialect == "postgresql"
    if pa.types.is_boolean(data_type):
        return "BOOLEAN"
    if pa.types.is_integer(data_type):
        if not postgres:
            return "INTEGER"
        return (
            "SMALLINT" if data_type.bit_width <= 16 else "INTEGER" if data_type.bit_width == 32 else "BIGINT"
        )
    if pa.types.is_floating(data_type):
        return "DOUBLE PRECISION" if postgres else "REAL"
    if pa.types.is_decimal(data_type):
        return f"NUMERIC({data_type.precision},{data_type.scale})"
    if pa.types.is_timestamp(data_type) and postgres:
        return "TIMESTAMPTZ" if data_type.tz else "TIMESTAMP"
    if pa.types.is_date(data_type) and postgres:
        return "DATE"
    return "TEXT"  # strings, and on SQLite timestamps and dates as ISO text


class SqlTarget(Target):
    """A table on PostgreSQL or SQLite (any SQLAlchemy URL of those two dialects)."""

    def __init__(self, spec: SqlTargetSpec):
        import sqlalchemy as sa

        self.spec = spec
        url = spec.url if spec.url is not None else os.environ.get(spec.url_env or "")
        if not url:
            raise ConfigurationError(f"environment variable {spec.url_env} (the target's url_env) is not set")
        self.engine = sa.create_engine(url)
        self.dialect = self.engine.dialect.name
        if self.dialect not in ("postgresql", "sqlite"):
            raise ConfigurationError(f"SQL targets are PostgreSQL or SQLite, not {self.dialect}")
        if self.dialect == "sqlite":
            _transactional_ddl(self.engine)
        self.kind = "postgres" if self.dialect == "postgresql" else "sqlite"
        schema, _, table = spec.table.rpartition(".")
        self.schema, self.table = schema or None, table
        self.description = f"{self.kind} table {spec.table}"

    def dispose(self) -> None:
        self.engine.dispose()

    def _quote(self, name: str) -> str:
        return self.engine.dialect.identifier_preparer.quote(name)

    def _qualified(self, table: str) -> str:
        return f"{self._quote(self.schema)}.{self._quote(table)}" if self.schema else self._quote(table)

    @property
    def staged_name(self) -> str:
        return f"{self.table}_staged"

    @property
    def quarantine_name(self) -> str:
        return f"{self.table}_quarantine"

    def _exists(self, connection: Any, table: str) -> bool:
        import sqlalchemy as sa

        return sa.inspect(connection).has_table(table, schema=self.schema)

    def _create_sql(self, table: str, schema: pa.Schema, *, if_not_exists: bool = False) -> str:
        columns = ", ".join(f"{self._quote(f.name)} {_sql_type(f.type, self.dialect)}" for f in schema)
        guard = "IF NOT EXISTS " if if_not_exists else ""
        return f"CREATE TABLE {guard}{self._qualified(table)} ({columns})"

    def _create(self, connection: Any, table: str, schema: pa.Schema, *, if_not_exists: bool = False) -> None:
        import sqlalchemy as sa

        connection.execute(sa.text(self._create_sql(table, schema, if_not_exists=if_not_exists)))

    def _insert(self, connection: Any, table: str, rows: pa.Table) -> None:
        """Bulk insert inside the connection's transaction: COPY on PostgreSQL, executemany on SQLite."""
        if rows.num_rows == 0:
            return
        names = ", ".join(self._quote(name) for name in rows.column_names)
        cursor = connection.connection.driver_connection.cursor()
        try:
            if self.dialect == "postgresql":
                buffer = io.BytesIO()
                # Strings are always quoted and nulls written as nothing, which is how COPY's CSV
                # format tells an empty string from a null. Aware timestamps go as UTC wall time with
                # the transaction's time zone set to UTC: Arrow formats zoned values ~25x slower.
                cursor.execute("SET LOCAL TIME ZONE 'UTC'")
                pa_csv.write_csv(_utc_wall_time(rows), buffer, pa_csv.WriteOptions(include_header=False))
                buffer.seek(0)
                cursor.copy_expert(f"COPY {self._qualified(table)} ({names}) FROM STDIN (FORMAT csv)", buffer)
            else:
                columns = [_sqlite_values(rows.column(index)) for index in range(rows.num_columns)]
                marks = ", ".join("?" * rows.num_columns)
                cursor.executemany(
                    f"INSERT INTO {self._qualified(table)} ({names}) VALUES ({marks})",
                    zip(*columns, strict=True),
                )
        finally:
            cursor.close()

    def stage(self, table: pa.Table, load_id: str) -> None:
        import sqlalchemy as sa

        staged = with_load_id(table, load_id)
        if self.dialect == "postgresql" and all(_binary_copy_fits(field.type) for field in staged.schema):
            self._stage_by_binary_copy(staged)
            return
        with self.engine.begin() as connection:
            connection.execute(sa.text(f"DROP TABLE IF EXISTS {self._qualified(self.staged_name)}"))
            self._create(connection, self.staged_name, staged.schema)
            self._insert(connection, self.staged_name, staged)

    def _stage_by_binary_copy(self, staged: pa.Table) -> None:
        """Drop, create and fill the staging table in one transaction, the rows sent by the ADBC
        PostgreSQL driver as binary COPY straight from Arrow: nothing is formatted as text by us or
        parsed by the server, and the driver streams while the server writes."""
        import adbc_driver_postgresql.dbapi as adbc

        uri = self.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        with adbc.connect(uri) as connection, connection.cursor() as cursor:
            cursor.execute(f"DROP TABLE IF EXISTS {self._qualified(self.staged_name)}")
            cursor.execute(self._create_sql(self.staged_name, staged.schema))
            cursor.adbc_ingest(self.staged_name, staged, mode="append", db_schema_name=self.schema)
            connection.commit()

    def _staged_columns(self, connection: Any) -> list[str]:
        import sqlalchemy as sa

        return [
            column["name"] for column in sa.inspect(connection).get_columns(self.staged_name, self.schema)
        ]

    def _count(self, connection: Any, table: str, where: str = "", **params: Any) -> int:
        import sqlalchemy as sa

        return connection.execute(
            sa.text(f"SELECT COUNT(*) FROM {self._qualified(table)} {where}"), params
        ).scalar_one()

    def publish(self, mode: str, keys: list[str]) -> PublishOutcome:
        import sqlalchemy as sa

        target, staged = self._qualified(self.table), self._qualified(self.staged_name)
        with self.engine.begin() as connection:
            if not self._exists(connection, self.staged_name):
                raise JunctionError(
                    f"nothing is staged for {self.description}: materialize the staged asset first"
                )
            staged_rows = self._count(connection, self.staged_name)
            columns = self._staged_columns(connection)
            names = ", ".join(self._quote(name) for name in columns)
            if mode == "replace":
                connection.execute(sa.text(f"DROP TABLE IF EXISTS {target}"))
                connection.execute(sa.text(f"ALTER TABLE {staged} RENAME TO {self._quote(self.table)}"))
                return PublishOutcome(staged_rows, staged_rows)
            if not self._exists(connection, self.table):
                connection.execute(sa.text(f"CREATE TABLE {target} AS SELECT * FROM {staged} WHERE 1 = 0"))
            if mode == "append":
                load_ids = (
                    connection.execute(
                        sa.text(f"SELECT DISTINCT {self._quote(LOAD_ID_COLUMN)} FROM {staged}")
                    )
                    .scalars()
                    .all()
                )
                already = load_ids and self._count(
                    connection,
                    self.table,
                    f"WHERE {self._quote(LOAD_ID_COLUMN)} = :load_id",
                    load_id=load_ids[0],
                )
                if already:
                    connection.execute(sa.text(f"DROP TABLE {staged}"))
                    return PublishOutcome(
                        0,
                        self._count(connection, self.table),
                        f"load id {load_ids[0]} is already in the target",
                    )
                connection.execute(sa.text(f"INSERT INTO {target} ({names}) SELECT {names} FROM {staged}"))
            elif mode == "merge":
                key_list = ", ".join(self._quote(key) for key in keys)
                index = self._quote(f"{self.table}_merge_keys")
                connection.execute(
                    sa.text(f"CREATE UNIQUE INDEX IF NOT EXISTS {index} ON {target} ({key_list})")
                )
                updates = ", ".join(
                    f"{self._quote(name)} = excluded.{self._quote(name)}"
                    for name in columns
                    if name not in keys
                )
                action = f"DO UPDATE SET {updates}" if updates else "DO NOTHING"
                # `WHERE true` keeps SQLite's parser from reading ON CONFLICT as part of the SELECT.
                connection.execute(
                    sa.text(
                        f"INSERT INTO {target} ({names}) SELECT {names} FROM {staged} WHERE true "
                        f"ON CONFLICT ({key_list}) {action}"
                    )
                )
            else:
                raise ConfigurationError(f"unknown load mode {mode!r}")
            connection.execute(sa.text(f"DROP TABLE {staged}"))
            return PublishOutcome(staged_rows, self._count(connection, self.table))

    def write_quarantine(self, quarantine: Quarantine, load_id: str, run_id: str) -> None:
        import sqlalchemy as sa

        rows = quarantine_table(quarantine, load_id, run_id)
        with self.engine.begin() as connection:
            if not self._exists(connection, self.quarantine_name):
                if rows.num_rows == 0:
                    return
                self._create(connection, self.quarantine_name, rows.schema)
            connection.execute(
                sa.text(
                    f"DELETE FROM {self._qualified(self.quarantine_name)} "
                    f"WHERE {self._quote(LOAD_ID_COLUMN)} = :load_id"
                ),
                {"load_id": load_id},
            )
            self._insert(connection, self.quarantine_name, rows)

    def _read(self, table: str) -> pa.Table | None:
        import sqlalchemy as sa

        with self.engine.connect() as connection:
            if not self._exists(connection, table):
                return None
            result = connection.execute(sa.text(f"SELECT * FROM {self._qualified(table)}"))
            names = list(result.keys())
            rows = result.all()
        return pa.table({name: pa.array([row[index] for row in rows]) for index, name in enumerate(names)})

    def read(self) -> pa.Table:
        table = self._read(self.table)
        return pa.table({}) if table is None else table

    def read_staged(self) -> pa.Table | None:
        return self._read(self.staged_name)

    def read_quarantine(self) -> pa.Table | None:
        return self._read(self.quarantine_name)


def _binary_copy_fits(data_type: pa.DataType) -> bool:
    """Whether the ADBC driver's binary COPY form of `data_type` is exactly the PostgreSQL type that
    `_sql_type` declares for it (binary COPY converts nothing); other tables go by CSV COPY."""
    if pa.types.is_timestamp(data_type):
        return data_type.unit in ("s", "ms", "us")  # nanoseconds would be cut, not rounded
    return (
        pa.types.is_boolean(data_type)
        or data_type in (pa.int16(), pa.int32(), pa.int64(), pa.float64(), pa.date32())
        or pa.types.is_string(data_type)
        or pa.types.is_large_string(data_type)
    )


def _utc_wall_time(table: pa.Table) -> pa.Table:
    """Zoned timestamp columns as naive ones holding the same UTC instants (Arrow stores UTC)."""
    for index, field in enumerate(table.schema):
        if pa.types.is_timestamp(field.type) and field.type.tz:
            naive = table.column(index).cast(pa.timestamp(field.type.unit))
            table = table.set_column(index, field.name, naive)
    return table


def _transactional_ddl(engine: Any) -> None:
    """Make every SQLAlchemy transaction on SQLite a real one, DDL included.

    Python's sqlite3 module (legacy transaction control) only opens a transaction before INSERT /
    UPDATE / DELETE, so DROP TABLE and ALTER TABLE would commit on their own and a swap could lose the
    target halfway. SQLAlchemy's documented recipe: turn the driver's own handling off and emit BEGIN.
    """
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _driver_autocommit(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN")


def _sqlite_values(column: pa.ChunkedArray) -> list[Any]:
    """A column as values sqlite3 binds without adapters: temporal and decimal values as ISO text."""
    data_type = column.type
    if pa.types.is_timestamp(data_type) or pa.types.is_date(data_type) or pa.types.is_time(data_type):
        column = pc.cast(column, pa.string())
    elif pa.types.is_decimal(data_type):
        column = pc.cast(column, pa.string())
    return column.to_pylist()


# --- files --------------------------------------------------------------------------------------------


class FileTarget(Target):
    """A Parquet or CSV file; staged as Parquet next to it, published by an atomic rename."""

    def __init__(self, spec: FileTargetSpec, base_dir: Path):
        self.spec = spec
        path = Path(spec.path).expanduser()
        self.path = path if path.is_absolute() else Path(base_dir) / path
        self.kind = spec.format
        self.description = f"{spec.format} file {self.path}"

    def dispose(self) -> None:
        """A file target holds no connection."""

    @property
    def staged_path(self) -> Path:
        return self.path.with_name(self.path.name + ".staged.parquet")

    @property
    def quarantine_path(self) -> Path:
        return self.path.with_name(f"{self.path.stem}_quarantine.parquet")

    def _replace_file(self, destination: Path, table: pa.Table, file_format: str) -> None:
        """Write to a temp file in the destination's folder, then rename it over the destination."""
        destination.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(
            dir=destination.parent, prefix=f".{destination.name}.", suffix=".tmp"
        )
        os.close(handle)
        os.chmod(temp_name, 0o644)  # mkstemp's 0600 would hide the target from its readers
        try:
            if file_format == "csv":
                pa_csv.write_csv(table, temp_name)
            else:
                pq.write_table(table, temp_name)
            os.replace(temp_name, destination)
        except BaseException:
            Path(temp_name).unlink(missing_ok=True)
            raise

    def _read_file(self, path: Path, file_format: str, schema: pa.Schema | None = None) -> pa.Table:
        if file_format == "csv":
            types = {field.name: field.type for field in schema} if schema is not None else None
            return pa_csv.read_csv(path, convert_options=pa_csv.ConvertOptions(column_types=types))
        return pq.read_table(path)

    def stage(self, table: pa.Table, load_id: str) -> None:
        self._replace_file(self.staged_path, with_load_id(table, load_id), "parquet")

    def publish(self, mode: str, keys: list[str]) -> PublishOutcome:
        if not self.staged_path.exists():
            raise JunctionError(
                f"nothing is staged for {self.description}: materialize the staged asset first"
            )
        staged = pq.read_table(self.staged_path)
        current = self._read_file(self.path, self.spec.format, staged.schema) if self.path.exists() else None
        if mode == "replace" or current is None:
            result = staged
        elif mode == "append":
            load_ids = pc.unique(staged.column(LOAD_ID_COLUMN)).to_pylist()
            if (
                load_ids
                and LOAD_ID_COLUMN in current.column_names
                and pc.any(pc.is_in(current.column(LOAD_ID_COLUMN), pa.array(load_ids))).as_py()
            ):
                self.staged_path.unlink()
                return PublishOutcome(0, current.num_rows, f"load id {load_ids[0]} is already in the target")
            result = pa.concat_tables([current, staged], promote_options="permissive")
        elif mode == "merge":
            kept = current.join(staged.select(keys), keys=keys, join_type="left anti")
            result = pa.concat_tables([kept, staged], promote_options="permissive")
        else:
            raise ConfigurationError(f"unknown load mode {mode!r}")
        self._replace_file(self.path, result, self.spec.format)
        self.staged_path.unlink()
        return PublishOutcome(staged.num_rows, result.num_rows)

    def write_quarantine(self, quarantine: Quarantine, load_id: str, run_id: str) -> None:
        rows = quarantine_table(quarantine, load_id, run_id)
        if self.quarantine_path.exists():
            earlier = pq.read_table(self.quarantine_path)
            earlier = earlier.filter(pc.not_equal(earlier.column(LOAD_ID_COLUMN), load_id))
            rows = pa.concat_tables([earlier, rows], promote_options="permissive")
        elif rows.num_rows == 0:
            return
        self._replace_file(self.quarantine_path, rows, "parquet")

    def read(self) -> pa.Table:
        return self._read_file(self.path, self.spec.format) if self.path.exists() else pa.table({})

    def read_staged(self) -> pa.Table | None:
        return pq.read_table(self.staged_path) if self.staged_path.exists() else None

    def read_quarantine(self) -> pa.Table | None:
        return pq.read_table(self.quarantine_path) if self.quarantine_path.exists() else None


def open_target(spec: SqlTargetSpec | FileTargetSpec, base_dir: Path) -> Target:
    """The `Target` of a spec's `target:`; relative file paths resolve against `base_dir`."""
    if isinstance(spec, SqlTargetSpec):
        return SqlTarget(spec)
    return FileTarget(spec, base_dir)
