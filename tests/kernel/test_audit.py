"""The audit log: appends, queries, tamper detection and concurrent writers, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import multiprocessing
from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner
from sqlalchemy import event, text

from orchestration.cli import cli
from orchestration.kernel import audit
from orchestration.kernel.audit import GENESIS_HASH, AuditError, append, entry_hash, query, verify_chain
from orchestration.store.db import get_engine


def _append_three() -> list[audit.AuditRecord]:
    return [
        append(
            "api_key.create", actor="alice", target="api_key:ci", origin="cli", details={"scopes": ["admin"]}
        ),
        append("run.launch", actor="bob", target="pipeline:orders", origin="gateway", details={"run": "r1"}),
        append("approval.decide", actor="alice", target="approval:7", origin="dagster"),
    ]


def test_append_chains_entries_from_the_genesis_hash(store_url: str) -> None:
    first, second, third = _append_three()

    assert first.prev_hash == GENESIS_HASH
    assert second.prev_hash == first.entry_hash
    assert third.prev_hash == second.entry_hash
    assert first.time.tzinfo is not None and first.time.utcoffset() == timedelta(0)
    assert first.entry_hash == entry_hash(
        prev_hash=GENESIS_HASH,
        time=first.time,
        actor="alice",
        action="api_key.create",
        target="api_key:ci",
        origin="cli",
        details={"scopes": ["admin"]},
    )
    result = verify_chain()
    assert (result.ok, result.entries, result.head_hash, result.first_bad_id) == (
        True,
        3,
        third.entry_hash,
        None,
    )


def test_query_filters_newest_first_and_pages(store_url: str) -> None:
    first, second, third = _append_three()

    assert [r.id for r in query()] == [third.id, second.id, first.id]
    assert [r.id for r in query(actor="alice")] == [third.id, first.id]
    assert [r.id for r in query(action="run.launch")] == [second.id]
    assert [r.id for r in query(target="approval:7")] == [third.id]
    assert [r.id for r in query(limit=2)] == [third.id, second.id]
    assert [r.id for r in query(limit=2, before_id=second.id)] == [first.id]
    assert query(since=datetime.now(UTC) + timedelta(minutes=1)) == []
    assert [r.id for r in query(since=first.time, until=third.time)] == [second.id, first.id]
    assert query(actor="alice")[1].details == {"scopes": ["admin"]}
    stored = query(action="run.launch")[0]
    assert stored == second  # what append returned is what reads back, time included


def test_empty_log_verifies_with_the_genesis_head(store_url: str) -> None:
    assert verify_chain() == audit.ChainVerification(
        ok=True, entries=0, head_hash=GENESIS_HASH, first_bad_id=None, reason=None
    )


def test_append_rejects_unusable_input(store_url: str) -> None:
    with pytest.raises(AuditError, match="actor"):
        append("x.y", actor="")
    with pytest.raises(AuditError, match="JSON-serialisable"):
        append("x.y", actor="a", details={"when": datetime.now(UTC)})
    assert query() == []


def test_verify_names_an_edited_entry(store_url: str) -> None:
    _first, second, _third = _append_three()
    with get_engine().begin() as connection:
        connection.execute(text("UPDATE audit_log SET actor = 'mallory' WHERE id = :id"), {"id": second.id})

    result = verify_chain()
    assert (result.ok, result.first_bad_id) == (False, second.id)
    assert "edited" in result.reason


def test_verify_names_an_edited_details_field(store_url: str) -> None:
    first, _second, _third = _append_three()
    with get_engine().begin() as connection:
        connection.execute(
            text("UPDATE audit_log SET details = :details WHERE id = :id"),
            {"details": json.dumps({"scopes": ["runs:read"]}), "id": first.id},
        )

    result = verify_chain()
    assert (result.ok, result.first_bad_id, result.entries) == (False, first.id, 1)


def test_verify_names_the_entry_after_a_deleted_one(store_url: str) -> None:
    _first, second, third = _append_three()
    with get_engine().begin() as connection:
        connection.execute(text("DELETE FROM audit_log WHERE id = :id"), {"id": second.id})

    result = verify_chain()
    assert (result.ok, result.first_bad_id) == (False, third.id)
    assert "deleted" in result.reason


def test_verify_detects_a_forged_entry_with_a_recomputed_hash(store_url: str) -> None:
    first, second, third = _append_three()
    forged_hash = entry_hash(
        prev_hash=second.prev_hash,
        time=second.time,
        actor="mallory",
        action=second.action,
        target=second.target,
        origin=second.origin,
        details=second.details,
    )
    with get_engine().begin() as connection:
        connection.execute(
            text("UPDATE audit_log SET actor = 'mallory', entry_hash = :hash WHERE id = :id"),
            {"hash": forged_hash, "id": second.id},
        )

    result = verify_chain()
    assert (result.ok, result.first_bad_id) == (False, third.id)


def test_verify_detects_reordered_entries(store_url: str) -> None:
    first, second, _third = _append_three()
    columns = ("occurred_at", "actor", "action", "target", "origin", "details", "prev_hash", "entry_hash")
    with get_engine().begin() as connection:
        rows = {
            row.id: row
            for row in connection.execute(
                text(f"SELECT id, {', '.join(columns)} FROM audit_log WHERE id IN (:a, :b)"),
                {"a": first.id, "b": second.id},
            )
        }
        # Swap the two rows' contents through a parking spot (prev_hash and entry_hash are UNIQUE).
        connection.execute(
            text("UPDATE audit_log SET prev_hash = 'parked', entry_hash = 'parked' WHERE id = :id"),
            {"id": first.id},
        )
        for target_id, source_id in ((second.id, first.id), (first.id, second.id)):
            source = rows[source_id]
            values = {column: getattr(source, column) for column in columns}
            if isinstance(values["details"], dict):
                values["details"] = json.dumps(values["details"])
            assignments = ", ".join(f"{column} = :{column}" for column in columns)
            connection.execute(
                text(f"UPDATE audit_log SET {assignments} WHERE id = :id"), {**values, "id": target_id}
            )

    result = verify_chain()
    assert (result.ok, result.first_bad_id) == (False, first.id)


def test_entries_are_read_in_bounded_pages(store_url: str) -> None:
    records = [append("tick", actor="clock", details={"n": n}) for n in range(8)]
    engine = get_engine()
    page_queries: list[str] = []

    def count_audit_selects(_conn, _cursor, statement, _params, _context, _executemany):
        if statement.lstrip().upper().startswith("SELECT") and "audit_log" in statement:
            page_queries.append(statement)

    event.listen(engine, "before_cursor_execute", count_audit_selects)
    try:
        streamed = list(audit.iter_entries(engine, page_size=3))
    finally:
        event.remove(engine, "before_cursor_execute", count_audit_selects)

    assert [record.id for record in streamed] == [record.id for record in records]
    assert len(page_queries) == 3  # 3 + 3 + 2 rows, never the whole table at once
    assert verify_chain().entries == 8


def test_a_stale_head_is_refused_by_the_database_and_retried(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = append("first", actor="a")
    real_head = audit._chain_head
    stale_reads: list[str] = []

    def stale_once(session):
        # The first read pretends another writer has not appended yet (a racing writer's view).
        if not stale_reads:
            stale_reads.append(GENESIS_HASH)
            return GENESIS_HASH
        return real_head(session)

    monkeypatch.setattr(audit, "_chain_head", stale_once)
    second = append("second", actor="a")

    assert stale_reads == [GENESIS_HASH]
    assert second.prev_hash == first.entry_hash
    assert verify_chain().entries == 2


def test_append_gives_up_after_bounded_retries(store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    append("first", actor="a")
    attempts: list[int] = []

    def always_stale(_session):
        attempts.append(1)
        return GENESIS_HASH

    monkeypatch.setattr(audit, "_chain_head", always_stale)
    monkeypatch.setattr(audit, "MAX_APPEND_ATTEMPTS", 3)
    with pytest.raises(AuditError, match="chain head kept moving"):
        append("second", actor="a")
    assert len(attempts) == 3
    assert [record.action for record in query()] == ["first"]


def _append_many(url: str, worker: int, count: int, barrier) -> None:
    """Run in a spawned process: wait for every writer, then append `count` entries."""
    barrier.wait(timeout=60)
    engine = get_engine(url)
    for n in range(count):
        append("load.test", actor=f"writer-{worker}", details={"n": n}, origin="test", engine=engine)


def test_concurrent_writers_never_fork_the_chain(store_url: str) -> None:
    writers, per_writer = 4, 50
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(writers)
    processes = [
        context.Process(target=_append_many, args=(store_url, worker, per_writer, barrier))
        for worker in range(writers)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=180)
    assert [process.exitcode for process in processes] == [0] * writers

    result = verify_chain()
    assert (result.ok, result.entries) == (True, writers * per_writer)
    with get_engine().connect() as connection:
        rows = connection.execute(text("SELECT prev_hash, entry_hash FROM audit_log ORDER BY id")).all()
    # Linear: every entry but the first follows exactly the one before it, and no hash is used twice.
    assert rows[0].prev_hash == GENESIS_HASH
    assert all(rows[i].prev_hash == rows[i - 1].entry_hash for i in range(1, len(rows)))
    assert len({row.prev_hash for row in rows}) == len(rows)
    per_actor = {record.actor for record in query(limit=1000)}
    assert per_actor == {f"writer-{worker}" for worker in range(writers)}


def test_cli_verify_and_list(store_url: str) -> None:
    _first, second, _third = _append_three()
    runner = CliRunner()

    ok = runner.invoke(cli, ["audit", "verify"])
    assert ok.exit_code == 0, ok.output
    assert "intact: 3 entries" in ok.output

    listed = runner.invoke(cli, ["audit", "list", "--actor", "alice", "--json"])
    assert listed.exit_code == 0, listed.output
    lines = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [line["action"] for line in lines] == ["approval.decide", "api_key.create"]

    table = runner.invoke(cli, ["audit", "list", "--action", "run.launch", "--since", "1h"])
    assert table.exit_code == 0
    assert (
        "run.launch" in table.output
        and "pipeline:orders" in table.output
        and "api_key.create" not in table.output
    )

    with get_engine().begin() as connection:
        connection.execute(text("UPDATE audit_log SET target = 'x' WHERE id = :id"), {"id": second.id})
    broken = runner.invoke(cli, ["audit", "verify"])
    assert broken.exit_code == 1
    assert f"broken at entry #{second.id}" in broken.output


def test_cli_list_rejects_a_bad_since(store_url: str) -> None:
    result = CliRunner().invoke(cli, ["audit", "list", "--since", "yesterday"])
    assert result.exit_code == 2
    assert "neither a duration" in result.output
