"""`junction events` through click's CliRunner, on the embedded default (SQLite store)."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestration.cli import cli, main
from orchestration.settings import reset_settings_cache

STREAM_YAML = """\
name: orders
description: test orders
payload_schema:
  type: object
  required: [order_id, amount]
  properties:
    order_id: {type: string}
    amount: {type: number}
retention: {max_count: 1000}
"""


@pytest.fixture
def streams_dir(junction_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "streams"
    folder.mkdir()
    (folder / "orders.yaml").write_text(STREAM_YAML)
    monkeypatch.setenv("JUNCTION_STREAMS_DIR", str(folder))
    reset_settings_cache()
    return folder


def invoke(*args: str, input: str | None = None):
    return CliRunner().invoke(cli, ["events", *args], input=input)


@pytest.mark.parametrize(
    "command",
    [[], ["streams"], ["publish"], ["tail"], ["replay"], ["stats"], ["transfer"]],
    ids=lambda c: " ".join(c) or "group",
)
def test_help_everywhere(command: list[str]):
    result = invoke(*command, "--help")
    assert result.exit_code == 0 and "Usage: cli events" in result.output


def test_streams_lists_the_yaml_declarations(streams_dir: Path):
    result = invoke("streams")
    assert result.exit_code == 0, result.output
    assert "orders  yaml:orders.yaml  1000" in result.output and "test orders" in result.output
    declared = json.loads(invoke("streams", "--json").output)
    assert declared[0]["name"] == "orders" and declared[0]["retention"]["max_count"] == 1000


def test_publish_reports_each_item(streams_dir: Path, tmp_path: Path):
    single = invoke("publish", "orders", '{"order_id": "a", "amount": 1}', "--key", "a")
    assert single.exit_code == 0, single.output
    assert single.stdout.startswith("0\taccepted\t")
    again = invoke("publish", "orders", '{"order_id": "a", "amount": 1}', "--key", "a")
    assert again.stdout.split("\t")[:2] == ["0", "duplicate"]

    lines = [{"order_id": "b", "amount": 2}, {"order_id": "c"}, {"order_id": "d", "amount": 4}]
    path = tmp_path / "orders.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    result = invoke("publish", "orders", f"@{path}", "--key-field", "order_id")
    assert result.exit_code == 1
    assert [row.split("\t")[:2] for row in result.stdout.splitlines()] == [
        ["0", "accepted"],
        ["1", "rejected"],
        ["2", "accepted"],
    ]
    assert 'payload: "amount" is a required property' in result.stdout
    assert str(result.exception) == "1 of 3 events were rejected"

    path.write_text('{"order_id": "e", "amount": 5}\n{not json\n')
    broken = invoke("publish", "orders", f"@{path}")
    assert broken.exit_code == 1 and f"{path}: line 2: not JSON" in str(broken.exception)


def test_tail_from_and_filter_and_follow(streams_dir: Path):
    invoke("publish", "orders", json.dumps([{"order_id": str(n), "amount": n} for n in range(6)]))
    everything = [json.loads(line) for line in invoke("tail", "orders").stdout.splitlines()]
    assert [e["payload"]["amount"] for e in everything] == list(range(6))

    from_id = invoke("tail", "orders", "--from", everything[4]["id"])
    assert [json.loads(line)["payload"]["amount"] for line in from_id.stdout.splitlines()] == [4, 5]
    filtered = invoke(
        "tail", "orders", "--filter", '{"field": "amount", "op": "gte", "value": 3}', "--limit", "2"
    )
    assert [json.loads(line)["payload"]["amount"] for line in filtered.stdout.splitlines()] == [3, 4]

    bad_filter = invoke("tail", "orders", "--filter", '{"field": "amount", "op": "bigger", "value": 3}')
    assert bad_filter.exit_code == 2 and "unknown operator 'bigger'" in bad_filter.output

    later = threading.Timer(0.3, lambda: invoke("publish", "orders", '{"order_id": "late", "amount": 99}'))
    later.start()
    started = time.monotonic()
    followed = invoke("tail", "orders", "--follow", "--limit", "1")
    later.join()
    assert followed.exit_code == 0, followed.output
    assert json.loads(followed.stdout)["payload"]["order_id"] == "late"
    assert time.monotonic() - started < 10


def test_replay_a_time_range_to_a_file(streams_dir: Path, tmp_path: Path):
    invoke("publish", "orders", '{"order_id": "before", "amount": 0}')
    time.sleep(0.02)
    start = datetime.now(UTC).isoformat()
    invoke("publish", "orders", json.dumps([{"order_id": f"in-{n}", "amount": n} for n in range(3)]))
    time.sleep(0.02)
    end = datetime.now(UTC).isoformat()
    time.sleep(0.02)
    invoke("publish", "orders", '{"order_id": "after", "amount": 0}')

    output = tmp_path / "replay.jsonl"
    result = invoke("replay", "orders", "--from", start, "--to", end, "--output", str(output))
    assert result.exit_code == 0, result.output
    replayed = [json.loads(line) for line in output.read_text().splitlines()]
    assert [e["payload"]["order_id"] for e in replayed] == ["in-0", "in-1", "in-2"]
    assert "replayed 3 events of orders" in result.stderr

    by_id = invoke("replay", "orders", "--from", replayed[1]["id"], "--to", replayed[2]["id"])
    assert [json.loads(line)["payload"]["order_id"] for line in by_id.stdout.splitlines()] == ["in-1", "in-2"]


def test_replay_as_runs_options(streams_dir: Path, monkeypatch: pytest.MonkeyPatch):
    help_text = invoke("replay", "--help").output
    assert "--as-runs" in help_text and "--trigger" in help_text and "--replay-id" in help_text
    both = invoke("replay", "orders", "--from", "1h", "--as-runs", "--output", "x.jsonl")
    assert both.exit_code == 2 and "--output write events to a file; --as-runs launches runs" in both.output
    alone = invoke("replay", "orders", "--from", "1h", "--trigger", "t")
    assert alone.exit_code == 2 and "--trigger applies to --as-runs only" in alone.output
    bad_id = invoke("replay", "orders", "--from", "1h", "--as-runs", "--replay-id", "a b")
    assert bad_id.exit_code == 2 and "--replay-id" in bad_id.output


def test_replay_as_runs_needs_the_running_platform(
    streams_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    from support import free_port

    monkeypatch.setenv("JUNCTION_DAGSTER_URL", f"http://127.0.0.1:{free_port()}")
    reset_settings_cache()
    with pytest.raises(SystemExit) as exited:
        main(["events", "replay", "orders", "--from", "1h", "--as-runs"])
    assert exited.value.code == 1
    error = capsys.readouterr().err
    assert error.startswith("Error: Dagster at http://127.0.0.1:") and "is unreachable" in error
    assert "start `junction dev`, or point JUNCTION_DAGSTER_URL at its Dagster webserver" in error


def test_a_stream_changes_owner_only_by_an_explicit_transfer(
    streams_dir: Path, capsys: pytest.CaptureFixture[str]
):
    from orchestration.kernel import audit
    from resources.event_stream import StreamRegistry, StreamSpec

    assert invoke("streams").exit_code == 0  # migrates the store
    registry = StreamRegistry.for_url()
    registry.upsert(StreamSpec(name="payments", description="by the API"), origin="api")
    declared = streams_dir / "payments.yaml"
    declared.write_text("name: payments\ndescription: by the file\n")

    # The YAML sync refuses to overwrite the API's stream: every command says which file and stream.
    with pytest.raises(SystemExit):
        main(["events", "streams"])
    error = capsys.readouterr().err
    assert f"Error: {declared}: name: stream 'payments' is declared through the API" in error
    assert "`junction events transfer payments --to yaml`" in error
    assert registry.get("payments").description == "by the API"

    to_api = invoke("transfer", "payments", "--to", "api")
    assert to_api.exit_code == 1 and f"still declared in {declared}" in str(to_api.exception)
    to_yaml = invoke("transfer", "payments", "--to", "yaml")
    assert to_yaml.exit_code == 0, to_yaml.output
    assert to_yaml.output == "stream payments: owner api -> yaml:payments.yaml\n"
    assert "payments  yaml:payments.yaml" in invoke("streams").output
    assert StreamRegistry.for_url().get("payments").description == "by the file"

    declared.unlink()
    back = invoke("transfer", "payments", "--to", "api")
    assert back.output == "stream payments: owner yaml:payments.yaml -> api\n"
    kept = StreamRegistry.for_url().get("payments")
    assert (kept.origin, kept.description) == ("api", "by the file")
    entries = audit.query(action="stream.transfer")
    assert [(e.details["from"], e.details["to"], e.origin) for e in entries] == [
        ("yaml:payments.yaml", "api", "cli"),
        ("api", "yaml:payments.yaml", "cli"),
    ]
    nobody = invoke("transfer", "payments", "--to", "yaml")
    assert nobody.exit_code == 1 and "no file of the streams folder declares stream 'payments'" in str(
        nobody.exception
    )


def test_stats(streams_dir: Path):
    invoke("publish", "orders", json.dumps([{"order_id": str(n), "amount": n} for n in range(3)]))
    table = invoke("stats")
    assert table.exit_code == 0 and "orders" in table.output
    [figures] = json.loads(invoke("stats", "orders", "--json").stdout)
    assert (figures["length"], figures["events_added"], figures["dead_lettered"]) == (3, 3, 0)


def test_errors_are_one_line(streams_dir: Path, capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as exited:
        main(["events", "tail", "nowhere"])
    assert exited.value.code == 1
    assert capsys.readouterr().err == (
        "Error: stream 'nowhere' is not declared (declare it in the streams folder or the API)\n"
    )

    (streams_dir / "broken.yaml").write_text("name: BAD\n")
    with pytest.raises(SystemExit):
        main(["events", "streams"])
    assert f"Error: {streams_dir / 'broken.yaml'}: name: must be 1-150 characters" in capsys.readouterr().err
