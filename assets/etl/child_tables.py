"""Child tables: a list field of the records (an order's `lines`) published as its own table
`<table>__<field>`, one row per element, carrying the parent's key — as dlt's nested tables do.

Declared on a SQL target (`children: [lines]`). The list travels through the run as the staged
column it is (JSON text from a REST source, or an Arrow list), so checks, contracts and quarantine
see the record whole; at publish, inside the publish transaction, the column is taken out of the
staged table and turned into the child rows: each element an object flattened into columns (joined
by `__`, like the REST source's nested objects) or a scalar under `value`, with the parent's key
columns named `<table>_<key>` and the element's place in the list as `_junction_list_index`. The
load is a merge by the parent's keys (the spec requires it): the children of every staged parent
are deleted and its staged list inserted, so a list that shrank loses the elements it no longer has.
The parent rows and their children commit together or not at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
import pyarrow as pa

from assets.etl.sources.base import records_table
from orchestration.errors import JunctionError

if TYPE_CHECKING:
    from assets.etl.loads import SqlTarget

__all__ = ["LIST_INDEX_COLUMN", "ChildRows", "child_table_name", "take_children", "write_children"]

LIST_INDEX_COLUMN = "_junction_list_index"


def child_table_name(table: str, field: str) -> str:
    return f"{table}__{field}"


def parent_key_column(table: str, key: str) -> str:
    return f"{table}_{key}"


@dataclass
class ChildRows:
    """The child rows of one list field, taken from the staged parents."""

    table: str
    rows: pa.Table
    parent_keys: pa.Table  # the staged parents' keys (under the child's column names)


def _elements(value: Any, field: str, row: int) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            raise JunctionError(
                f"target.children: field {field!r} of staged row {row} is not a JSON list: {value[:80]!r}"
            ) from None
    if not isinstance(value, list):
        raise JunctionError(
            f"target.children: field {field!r} of staged row {row} holds {type(value).__name__}, not a list"
        )
    return value


def explode(parents: pa.Table, field: str, table: str, keys: list[str]) -> ChildRows:
    """The elements of `parents[field]` as child rows, with the parents' `keys` carried."""
    from assets.etl.sources.rest import flatten

    key_columns = [parent_key_column(table, key) for key in keys]
    key_values = [parents.column(key).to_pylist() for key in keys]
    rows: list[dict[str, Any]] = []
    for index, value in enumerate(parents.column(field).to_pylist()):
        carried = {column: values[index] for column, values in zip(key_columns, key_values, strict=True)}
        for position, element in enumerate(_elements(value, field, index + 1)):
            row = flatten(element, "__", "flatten") if isinstance(element, dict) else {"value": element}
            rows.append({**row, **carried, LIST_INDEX_COLUMN: position})
    names = [*key_columns, LIST_INDEX_COLUMN]
    parent_keys = pa.table(dict(zip(key_columns, [parents.column(key) for key in keys], strict=True)))
    # No element at all: the key columns keep the parents' types (a child table created now is right).
    empty = pa.schema([*parent_keys.schema, pa.field(LIST_INDEX_COLUMN, pa.int64())])
    child = records_table(rows) if rows else empty.empty_table()
    ordered = names + [name for name in child.column_names if name not in names]
    return ChildRows(child_table_name(table, field), child.select(ordered), parent_keys)


def take_children(target: SqlTarget, connection: Any, fields: list[str], keys: list[str]) -> list[ChildRows]:
    """Read the list fields out of the staged table and drop them from it (the parent table keeps
    the other columns). Fields the staged rows lack (an empty window) give no child rows."""
    import sqlalchemy as sa

    present = set(target._staged_columns(connection))
    missing_keys = [key for key in keys if key not in present]
    taken = [field for field in fields if field in present]
    if not taken:
        return []
    if missing_keys:
        raise JunctionError(f"target.children: the staged rows have no key column {missing_keys[0]!r}")
    staged = target._qualified(target.staged_name)
    names = ", ".join(target._quote(name) for name in [*keys, *taken])
    result = connection.execute(sa.text(f"SELECT {names} FROM {staged}"))
    columns = list(zip(*result.all(), strict=False)) or [() for _ in [*keys, *taken]]
    parents = pa.table(
        {name: pa.array(list(values)) for name, values in zip([*keys, *taken], columns, strict=True)}
    )
    children = [explode(parents, field, target.table, keys) for field in taken]
    for field in taken:
        connection.execute(sa.text(f"ALTER TABLE {staged} DROP COLUMN {target._quote(field)}"))
    return children


def write_children(target: SqlTarget, connection: Any, children: list[ChildRows]) -> dict[str, int]:
    """Publish each field's child rows in place of the staged parents' children: rows written per table."""
    import sqlalchemy as sa

    written: dict[str, int] = {}
    for child in children:
        table = target._qualified(child.table)
        if not target._exists(connection, child.table):
            target._create(connection, child.table, child.rows.schema)
        else:
            present = {
                column["name"] for column in sa.inspect(connection).get_columns(child.table, target.schema)
            }
            for schema_field in child.rows.schema:
                if schema_field.name not in present:
                    connection.execute(
                        sa.text(
                            f"ALTER TABLE {table} ADD COLUMN {target._quote(schema_field.name)} "
                            f"{target.sql_type(schema_field.type)}"
                        )
                    )
        if child.parent_keys.num_rows:
            _delete_children_of(target, connection, child)
        target._insert(connection, child.table, child.rows)
        written[child.table] = child.rows.num_rows
    return written


def _delete_children_of(target: SqlTarget, connection: Any, child: ChildRows) -> None:
    """Delete the children of the staged parents (their lists are replaced by the staged ones)."""
    import sqlalchemy as sa

    keys = child.parent_keys.column_names
    scratch = f"{child.table}_parents{target.staged_name.removeprefix(target.table)}"
    connection.execute(sa.text(f"DROP TABLE IF EXISTS {target._qualified(scratch)}"))
    target._create(connection, scratch, child.parent_keys.schema)
    target._insert(connection, scratch, child.parent_keys)
    children = target._qualified(child.table)
    match = " AND ".join(f"{children}.{target._quote(key)} = p.{target._quote(key)}" for key in keys)
    connection.execute(
        sa.text(
            f"DELETE FROM {children} WHERE EXISTS (SELECT 1 FROM {target._qualified(scratch)} AS p WHERE {match})"
        )
    )
    connection.execute(sa.text(f"DROP TABLE {target._qualified(scratch)}"))
