"""The `outbox` channel: one JSON line per message in a local file, whole lines under concurrent senders.

Sends write their delivery records to the platform store on both backends (`store_url`: SQLite and the
real PostgreSQL).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from orchestration.cli import cli
from orchestration.cli.notifications import FOLLOW_POLL_INTERVAL_S
from orchestration.kernel.spec_errors import SpecError
from orchestration.settings import PROJECT_ROOT, reset_settings_cache
from orchestration.store import session_scope
from orchestration.store.models import NotificationDelivery
from resources.notifications import Message, NotificationError, OutboxChannel, send


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def stored_deliveries() -> list[NotificationDelivery]:
    with session_scope() as session:
        return list(session.scalars(select(NotificationDelivery).order_by(NotificationDelivery.id)))


def test_each_message_is_one_json_line_and_one_delivery_record(store_url: str, junction_home: Path) -> None:
    channel = OutboxChannel("finance", recipients=["finance@example.com"])
    first = send(
        channel,
        Message(subject="Large order A-1", body="Two\nlines — ünïcode", metadata={"order": 1}),
        origin="run:r1",
    )
    second = send(
        channel, Message(subject="Order A-2", body="b", html="<p>b</p>", recipients=["x@example.com"])
    )

    outbox = junction_home / "outbox" / "finance.jsonl"
    entries = read_lines(outbox)
    assert [(e["channel"], e["subject"], e["recipients"]) for e in entries] == [
        ("finance", "Large order A-1", ["finance@example.com"]),
        ("finance", "Order A-2", ["x@example.com"]),
    ]
    assert entries[0]["body"] == "Two\nlines — ünïcode" and entries[0]["metadata"] == {"order": 1}
    assert (entries[0]["html"], entries[1]["html"]) == (None, "<p>b</p>")
    assert datetime.fromisoformat(entries[0]["time"]).tzinfo is not None
    assert len(outbox.read_bytes().splitlines()) == 2  # the body's line break is escaped in the JSON

    rows = stored_deliveries()
    assert [(r.id, r.channel, r.kind, r.status, r.attempts, r.recipient) for r in rows] == [
        (first.id, "finance", "outbox", "delivered", 1, "finance@example.com"),
        (second.id, "finance", "outbox", "delivered", 1, "x@example.com"),
    ]
    assert (rows[0].origin, rows[0].response) == ("run:r1", f"appended to {outbox}")


def test_relative_paths_are_under_the_home_and_absolute_ones_are_kept(junction_home: Path, tmp_path: Path):
    assert OutboxChannel("ops").path == junction_home.resolve() / "outbox" / "ops.jsonl"
    assert OutboxChannel("ops", path="mail/ops.jsonl").path == junction_home.resolve() / "mail" / "ops.jsonl"
    elsewhere = tmp_path / "elsewhere.jsonl"
    assert OutboxChannel("ops", path=str(elsewhere)).path == elsewhere
    # Without recipients, the record names the file.
    assert OutboxChannel("ops").recipient(Message(subject="s", body="b")).startswith("outbox /")


def test_an_unwritable_outbox_fails_at_once_and_is_recorded(store_url: str, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the outbox's folder should be")
    channel = OutboxChannel("ops", path=str(blocker / "ops.jsonl"), retry={"max_attempts": 3})
    with pytest.raises(NotificationError, match="failed after 1 attempt") as caught:
        send(channel, Message(subject="s", body="b"))
    assert caught.value.record.status == "failed"
    assert [(r.status, r.attempts) for r in stored_deliveries()] == [("failed", 1)]


def test_unknown_outbox_fields_are_spec_errors() -> None:
    with pytest.raises(SpecError, match="file: unknown field"):
        OutboxChannel("ops", file="x.jsonl")


# Lines far longer than a pipe's atomic write size (4 KiB), so a non-atomic append would show.
BODY_SIZE = 64 * 1024
PER_WRITER = 25


def check_whole_lines(path: Path, writers: list[str]) -> None:
    entries = read_lines(path)  # a torn or interleaved line is not valid JSON
    assert len(entries) == len(writers) * PER_WRITER
    for writer in writers:
        mine = [e for e in entries if e["metadata"]["writer"] == writer]
        assert [e["metadata"]["n"] for e in mine] == list(range(PER_WRITER))
        assert all(e["body"] == writer * BODY_SIZE for e in mine)


def test_threads_sending_at_once_never_interleave_lines(junction_home: Path) -> None:
    channel = OutboxChannel("ops")
    writers = ["a", "b", "c", "d", "e", "f"]
    start = threading.Barrier(len(writers))

    def write(writer: str) -> None:
        start.wait()
        for n in range(PER_WRITER):
            channel.deliver(
                Message(subject=writer, body=writer * BODY_SIZE, metadata={"writer": writer, "n": n})
            )

    threads = [threading.Thread(target=write, args=(writer,)) for writer in writers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    check_whole_lines(channel.path, writers)


WRITER_PROGRAM = textwrap.dedent(
    f"""
    import sys
    from resources.notifications import Message, OutboxChannel
    writer = sys.argv[1]
    channel = OutboxChannel("ops")
    print("ready", flush=True)
    sys.stdin.readline()  # wait until every process is ready
    for n in range({PER_WRITER}):
        channel.deliver(Message(subject=writer, body=writer * {BODY_SIZE}, metadata={{"writer": writer, "n": n}}))
    """
)


def test_processes_sending_at_once_never_interleave_lines(junction_home: Path) -> None:
    writers = ["p", "q", "r", "s"]
    env = {**os.environ, "JUNCTION_HOME": str(junction_home), "PYTHONPATH": str(PROJECT_ROOT)}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER_PROGRAM, writer],
            cwd=PROJECT_ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        for writer in writers
    ]
    assert [process.stdout.readline() for process in processes] == [b"ready\n"] * len(writers)
    for process in processes:
        process.stdin.write(b"go\n")
        process.stdin.close()
    assert [process.wait(timeout=120) for process in processes] == [0] * len(writers)
    check_whole_lines(OutboxChannel("ops").path, writers)


# --- `junction notifications outbox` ----------------------------------------------------------------


def test_cli_shows_the_shipped_outboxes(junction_home: Path) -> None:
    channels = {name: OutboxChannel(name) for name in ("finance", "ops")}
    channels["finance"].deliver(
        Message(subject="Large order A-1", body="line one\nline two", recipients=["f@x"])
    )
    channels["ops"].deliver(Message(subject="Nightly report", body="ok"))
    channels["ops"].deliver(Message(subject="Nightly report 2", body="ok"))

    runner = CliRunner()
    everything = runner.invoke(cli, ["notifications", "outbox"])
    assert everything.exit_code == 0, everything.output
    assert "finance  → f@x\n  Large order A-1\n    line one\n    line two\n" in everything.output
    assert everything.output.count("  ops  → (no recipients)") == 2

    last_ops = runner.invoke(cli, ["notifications", "outbox", "ops", "--last", "1", "--json"])
    assert last_ops.exit_code == 0, last_ops.output
    assert [json.loads(line)["subject"] for line in last_ops.output.splitlines()] == ["Nightly report 2"]

    # `sales` is declared but has sent nothing yet.
    nothing = runner.invoke(cli, ["notifications", "outbox", "sales"])
    assert (nothing.exit_code, nothing.output) == (0, "no messages yet\n")


def test_cli_refuses_unknown_and_non_outbox_channels(junction_home: Path, tmp_path, monkeypatch) -> None:
    channels_file = tmp_path / "channels.yaml"
    channels_file.write_text(
        "channels:\n  hook: {kind: webhook, url: 'https://example.com/h', secret_env: HOOK_SECRET}\n"
    )
    monkeypatch.setenv("JUNCTION_CHANNELS_FILE", str(channels_file))
    reset_settings_cache()
    runner = CliRunner()
    unknown = runner.invoke(cli, ["notifications", "outbox", "finance"])
    assert unknown.exit_code == 2 and "unknown channel 'finance' (declared: hook)" in unknown.output
    webhook = runner.invoke(cli, ["notifications", "outbox", "hook"])
    assert webhook.exit_code == 2 and "channel 'hook' is a webhook channel, not an outbox" in webhook.output
    none = runner.invoke(cli, ["notifications", "outbox"])
    assert (none.exit_code, none.output) == (0, "no outbox channels are declared in the channels file\n")


def test_cli_follow_prints_messages_as_they_arrive(junction_home: Path) -> None:
    channel = OutboxChannel("ops")
    channel.deliver(Message(subject="before", body="b"))
    env = {**os.environ, "JUNCTION_HOME": str(junction_home), "PYTHONPATH": str(PROJECT_ROOT)}
    follower = subprocess.Popen(
        [sys.executable, "-m", "orchestration.cli", "notifications", "outbox", "ops", "--follow", "--json"],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert json.loads(follower.stdout.readline())["subject"] == "before"
        # A line still being written (no line break yet) is shown only once it is whole.
        with channel.path.open("ab") as stream:
            stream.write(b'{"channel": "ops", "subject": "ha')
        time.sleep(3 * FOLLOW_POLL_INTERVAL_S)
        with channel.path.open("ab") as stream:
            stream.write(b'lf"}\n')
        channel.deliver(Message(subject="after", body="b"))
        assert [json.loads(follower.stdout.readline())["subject"] for _ in range(2)] == ["half", "after"]
    finally:
        follower.terminate()
        follower.wait(timeout=30)
