"""What every source is: batches of Arrow rows with their positions, quarantined records, an identity."""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from assets.etl.quarantine import Batch, Quarantine

READ_STEP = "read"
READ_BLOCK_BYTES = 1 << 20
NEWLINE, CARRIAGE_RETURN = ord("\n"), ord("\r")
RECORD_TEXT_LIMIT = 2_000  # a quarantined raw record is kept up to this many characters


@dataclass(frozen=True)
class InputIdentity:
    """What was read, precisely enough that reading the same input again yields the same load id."""

    kind: str
    parts: tuple[tuple[str, ...], ...]

    @property
    def load_id(self) -> str:
        digest = hashlib.sha256(json.dumps([self.kind, self.parts]).encode()).hexdigest()
        return digest[:32]


class Source(ABC):
    """A pipeline input: batches of rows, the records it could not parse, and its identity."""

    @property
    @abstractmethod
    def description(self) -> str:
        """A short human description (a path or glob, a table) for messages and metadata."""

    @abstractmethod
    def identity(self) -> InputIdentity: ...

    @abstractmethod
    def read(self, quarantine: Quarantine) -> Iterator[Batch]:
        """Yield the rows in batches; unparseable records go to `quarantine` with step ``read``."""

    def notes(self) -> list[str]:
        """What the last `read` decided by itself (a detected XML record element): logged by the run."""
        return []

    def empty_input_problem(self) -> str | None:
        """After a `read` that gave no record at all: what the input holds instead, or None when it
        holds nothing (an empty table or query result, a CSV of only a header). The runner fails such
        a read unless the spec allows it: a spec that misses its records must not publish an empty
        table with a perfect score."""
        return None


def records_table(records: list[dict[str, Any]]) -> pa.Table:
    """Records as an Arrow table with every field any of them has: `pa.Table.from_pylist` takes the
    fields of the first record only, so a field the first record lacks would be dropped silently."""
    names = list(dict.fromkeys(name for record in records for name in record))
    return pa.table({name: [record.get(name) for record in records] for name in names})


def clip_record(text: str) -> str:
    return text if len(text) <= RECORD_TEXT_LIMIT else text[:RECORD_TEXT_LIMIT] + "…"
