"""An origin for the cache's write-behind tests: a SQLite file logging every write applied to it, in
the order applied (`JUNCTION_TEST_CACHE_ORIGIN`), optionally slow (`..._DELAY_S` per batch) or failing
while the file `..._FAIL` exists. Imported by name from a namespace's `writer`, in any process."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path


def _connect() -> sqlite3.Connection:
    connection = sqlite3.connect(os.environ["JUNCTION_TEST_CACHE_ORIGIN"], timeout=30)
    connection.execute("CREATE TABLE IF NOT EXISTS log (key TEXT, value TEXT, deleted INT, event_id TEXT)")
    return connection


def apply_writes(writes) -> None:
    if Path(os.environ["JUNCTION_TEST_CACHE_ORIGIN"] + ".fail").exists():
        raise ConnectionError("the origin is down")
    time.sleep(float(os.environ.get("JUNCTION_TEST_CACHE_ORIGIN_DELAY_S", "0")))
    with _connect() as connection:
        connection.executemany(
            "INSERT INTO log VALUES (?, ?, ?, ?)",
            [(w.key, None if w.deleted else str(w.value), int(w.deleted), w.event_id) for w in writes],
        )


def applied() -> list[tuple[str, str | None, int, str]]:
    """Every write applied, in the order applied."""
    if not Path(os.environ["JUNCTION_TEST_CACHE_ORIGIN"]).exists():
        return []
    with _connect() as connection:
        return connection.execute("SELECT key, value, deleted, event_id FROM log ORDER BY rowid").fetchall()


def state() -> dict[str, str | None]:
    """What the origin holds now: each key's newest applied value (deleted keys absent)."""
    current: dict[str, str | None] = {}
    for key, value, deleted, _ in applied():
        if deleted:
            current.pop(key, None)
        else:
            current[key] = value
    return current
