"""The REST target through Dagster against a local receiver that checks what real APIs check: rows
pushed one per request (PUT to a templated URL, a templated body, an Idempotency-Key) or in batches
(POST of a JSON array, bearer auth); a merge sends only rows new or changed since the API accepted
them; 503 and 429 (`Retry-After`) are retried; a 422 quarantines the row with status and body, fails
the publish past `max_failed_rows` without moving on, and a re-run sends only what is missing."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow.parquet as pq
import pytest
import yaml

from assets.etl.factory import build_pipeline
from assets.etl.spec import PipelineSpec, load_pipelines
from orchestration.kernel.spec_errors import SpecError, load_specs

NAME = "contacts_push"
TOKEN = "push-token-123"


@dataclass
class Receiver:
    url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)
    refuse: dict[str, int] = field(default_factory=dict)  # path -> status answered every time
    flaky: dict[str, list[int]] = field(default_factory=dict)  # path -> statuses answered first
    lock: threading.Lock = field(default_factory=threading.Lock)

    def paths(self) -> list[str]:
        return [request["path"] for request in self.requests]


@pytest.fixture(scope="module")
def served() -> Iterator[Receiver]:
    receiver = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            with receiver.lock:
                receiver.requests.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "headers": dict(self.headers),
                        "body": json.loads(raw) if raw else None,
                        "content_type": self.headers.get("Content-Type"),
                    }
                )
                queued = receiver.flaky.get(self.path)
                status = queued.pop(0) if queued else receiver.refuse.get(self.path, 200)
            if self.headers.get("Authorization") not in (None, f"Bearer {TOKEN}"):
                status = 401
            body = json.dumps({"ok": status < 300, "detail": "email is not valid" if status == 422 else ""})
            self.send_response(status)
            if status == 429:
                self.send_header("Retry-After", "0")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        do_PUT = do_POST = do_PATCH = _answer

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield receiver
    server.shutdown()


@pytest.fixture
def receiver(served: Receiver) -> Receiver:
    with served.lock:
        served.requests.clear()
        served.refuse.clear()
        served.flaky.clear()
    return served


def write_csv(folder: Path, rows: list[tuple[int, str, str]]) -> None:
    lines = ["id,name,email"] + [f"{i},{name},{email}" for i, name, email in rows]
    (folder / "contacts.csv").write_text("\n".join(lines) + "\n")


CONTACTS = [(1, "Ada", "ada@example.com"), (2, "Grace", "grace@example.com"), (3, "Alan", "alan@example"),
            (4, "Edsger", "edsger@example.com"), (5, "Barbara", "barbara@example.com")]  # fmt: skip


def write_spec(folder: Path, receiver: Receiver, target: dict[str, Any], mode: str = "merge") -> None:
    spec = {
        "source": {"kind": "file", "format": "csv", "path": "contacts.csv"},
        "transforms": [{"cast": {"id": "int64"}}],
        "target": {"kind": "rest", "retry": {"initial_backoff": "10ms", "max_attempts": 3}, **target},
        "load": {"mode": mode, "keys": ["id"]} if mode == "merge" else {"mode": mode},
    }
    spec["target"]["url"] = spec["target"]["url"].replace("RECEIVER", receiver.url)
    (folder / f"{NAME}.yaml").write_text(yaml.safe_dump(spec))


def run(folder: Path, instance: dg.DagsterInstance) -> dg.ExecuteInProcessResult:
    definitions = build_pipeline(load_pipelines([folder / f"{NAME}.yaml"])[NAME])
    return definitions.resolve_job_def(f"{NAME}_pipeline").execute_in_process(
        instance=instance, raise_on_error=False
    )


def published(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    [materialization] = result.asset_materializations_for_node(NAME)
    return {name: value.value for name, value in materialization.metadata.items()}


PER_ROW = {
    "url": "RECEIVER/contacts/{{ row.id }}",
    "method": "PUT",
    "body": {"full_name": "{{ row.name }}", "email": "{{ row.email }}"},
    "idempotency_key": "contact-{{ row.id }}-{{ row.email }}",
}


def test_a_merge_pushes_each_row_once_and_then_only_what_changed(
    receiver: Receiver, pipelines_dir: Path, junction_home: Path
):
    write_csv(pipelines_dir, CONTACTS)
    write_spec(pipelines_dir, receiver, dict(PER_ROW))
    instance = dg.DagsterInstance.ephemeral()

    first = run(pipelines_dir, instance)
    assert first.success
    assert sorted(receiver.paths()) == [f"/contacts/{i}" for i in range(1, 6)]
    ada = next(r for r in receiver.requests if r["path"] == "/contacts/1")
    assert ada["method"] == "PUT" and ada["content_type"] == "application/json"
    assert ada["body"] == {"full_name": "Ada", "email": "ada@example.com"}
    assert ada["headers"]["Idempotency-Key"] == "contact-1-ada@example.com"
    assert (
        published(first)["rows_new"],
        published(first)["rows_published"],
        published(first)["rows_failed"],
    ) == (5, 5, 0)
    ledger = pq.read_table(junction_home / "rest" / f"{NAME}.sent.parquet")
    assert sorted(ledger.column("id").to_pylist()) == [1, 2, 3, 4, 5]

    # Nothing changed: nothing is sent.
    receiver.requests.clear()
    again = run(pipelines_dir, instance)
    assert again.success and receiver.paths() == []
    assert published(again)["rows_unchanged"] == 5 and published(again)["rows_published"] == 0

    # One row changes and one arrives: exactly those two are sent.
    receiver.requests.clear()
    write_csv(
        pipelines_dir,
        [*CONTACTS[:2], (3, "Alan", "alan@example.org"), *CONTACTS[3:], (6, "Frances", "f@example.com")],
    )
    third = run(pipelines_dir, instance)
    assert sorted(receiver.paths()) == ["/contacts/3", "/contacts/6"]
    assert (
        published(third)["rows_new"],
        published(third)["rows_updated"],
        published(third)["rows_unchanged"],
    ) == (1, 1, 4)


def test_refused_rows_are_quarantined_the_publish_fails_and_a_rerun_sends_only_them(
    receiver: Receiver, pipelines_dir: Path, junction_home: Path
):
    write_csv(pipelines_dir, CONTACTS)
    write_spec(pipelines_dir, receiver, dict(PER_ROW))
    receiver.refuse["/contacts/3"] = 422
    receiver.flaky["/contacts/4"] = [503, 429]  # retried: the third attempt is accepted
    instance = dg.DagsterInstance.ephemeral()

    failed = run(pipelines_dir, instance)
    assert not failed.success
    failure = next(event for event in failed.all_events if event.is_step_failure)
    message = failure.step_failure_data.error.to_string()
    assert "refused 1 of 5 rows" in message and "answered 422" in message and "email is not valid" in message
    assert receiver.paths().count("/contacts/4") == 3
    quarantine = pq.read_table(junction_home / "rest" / f"{NAME}.sent_quarantine.parquet").to_pylist()
    [refused] = [row for row in quarantine if row["step"] == "publish"]
    assert "PUT " in refused["reason"] and "422" in refused["reason"]
    assert json.loads(refused["record"])["id"] == 3

    # The API is fixed; a new run sends only the row it refused (the four others are in the ledger).
    receiver.refuse.clear()
    receiver.requests.clear()
    fixed = run(pipelines_dir, instance)
    assert fixed.success
    assert receiver.paths() == ["/contacts/3"]
    assert published(fixed)["rows_unchanged"] == 4


def test_append_in_batches_with_bearer_auth_and_a_tolerated_refusal(
    receiver: Receiver, pipelines_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("PUSH_TOKEN", TOKEN)
    write_csv(pipelines_dir, CONTACTS)
    write_spec(
        pipelines_dir,
        receiver,
        {
            "url": "RECEIVER/bulk",
            "batch_size": 2,
            "auth": {"type": "bearer", "token_env": "PUSH_TOKEN"},
            "body": '{"contacts": [{% for r in rows %}{"id": {{ r.id }}}{{ "," if not loop.last }}{% endfor %}]}',
            "max_failed_rows": 2,
        },
        mode="append",
    )
    receiver.flaky["/bulk"] = [200, 400]  # the second request (rows 3 and 4) is refused
    result = run(pipelines_dir, dg.DagsterInstance.ephemeral())
    assert result.success
    bodies = [request["body"] for request in receiver.requests]
    assert bodies == [
        {"contacts": [{"id": 1}, {"id": 2}]},
        {"contacts": [{"id": 3}, {"id": 4}]},
        {"contacts": [{"id": 5}]},
    ]
    assert all(r["headers"]["Authorization"] == f"Bearer {TOKEN}" for r in receiver.requests)
    assert (published(result)["rows_published"], published(result)["rows_failed"]) == (3, 2)


def test_a_rest_target_cannot_be_replaced(tmp_path: Path):
    path = tmp_path / "push.yaml"
    path.write_text(
        "source: {kind: file, format: csv, path: x.csv}\n"
        "target: {kind: rest, url: 'http://x/{{ row.id }}'}\n"
        "load: {mode: replace}\n"
    )
    with pytest.raises(SpecError, match="cannot be replaced"):
        load_specs([path], PipelineSpec)


def test_an_incremental_push_moves_its_cursor_only_when_the_publish_succeeds(
    receiver: Receiver, pipelines_dir: Path, junction_home: Path
):
    import sqlite3

    from assets.etl.loads import open_target, target_base_dir

    with sqlite3.connect(pipelines_dir / "crm.db") as connection:
        connection.execute("CREATE TABLE contacts (id INTEGER PRIMARY KEY, name TEXT, updated_at TEXT)")
        connection.executemany(
            "INSERT INTO contacts VALUES (?, ?, ?)",
            [(i, f"contact {i}", f"2024-01-0{i}T00:00:00Z") for i in range(1, 4)],
        )
    spec = {
        "source": {"kind": "sql", "url": "sqlite:///crm.db", "table": "contacts"},
        "incremental": {"cursor": "updated_at", "initial": "2024-01-01T00:00:00Z"},
        "target": {"kind": "rest", "url": f"{receiver.url}/contacts/{{{{ row.id }}}}", "method": "PATCH",
                   "retry": {"max_attempts": 1}},
        "load": {"mode": "merge", "keys": ["id"]},
    }  # fmt: skip
    (pipelines_dir / f"{NAME}.yaml").write_text(yaml.safe_dump(spec))
    pipeline = load_pipelines([pipelines_dir / f"{NAME}.yaml"])[NAME]

    def cursor() -> str | None:
        target = open_target(pipeline.spec.target, target_base_dir(), pipeline=NAME)
        state = target.read_state(NAME)
        return None if state is None else state.value

    instance = dg.DagsterInstance.ephemeral()
    receiver.refuse["/contacts/3"] = 409
    assert not run(pipelines_dir, instance).success
    assert cursor() is None  # the refused row's window is read again
    receiver.refuse.clear()
    receiver.requests.clear()
    assert run(pipelines_dir, instance).success
    assert receiver.paths() == ["/contacts/3"] and cursor() == "2024-01-03T00:00:00Z"
    assert {r["method"] for r in receiver.requests} == {"PATCH"}
