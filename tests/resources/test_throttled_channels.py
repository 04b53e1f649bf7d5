"""Throttling and digests: messages held, never dropped, sent together; every count adds up.

Outbox channels receive the messages (each line one message), so what a receiver got is read from
its file; delivery records are read from the platform store on both backends (`store_url`).
"""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest
from click.testing import CliRunner
from sqlalchemy import select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from support import ServedApp, free_port

from orchestration.cli import cli
from orchestration.kernel.spec_errors import SpecError
from orchestration.settings import reset_settings_cache
from orchestration.store import session_scope
from orchestration.store.models import NotificationDelivery
from resources.notifications import Message, OutboxChannel, WebhookChannel, held, load_channels, send
from sensors.notification_digests import notification_digests

FAST_RETRY = {"max_attempts": 2, "initial_backoff_s": 0.01, "max_backoff_s": 0.05}


def lines(channel: OutboxChannel) -> list[dict]:
    if not channel.path.exists():
        return []
    return [json.loads(line) for line in channel.path.read_text(encoding="utf-8").splitlines()]


def statuses() -> list[str]:
    with session_scope() as session:
        return list(session.scalars(select(NotificationDelivery.status).order_by(NotificationDelivery.id)))


def later(minutes: float) -> datetime:
    return datetime.now(UTC) + timedelta(minutes=minutes)


def test_a_throttled_channel_holds_the_excess_and_sends_it_as_one_digest(store_url: str) -> None:
    channel = OutboxChannel("ops", throttle={"max_messages": 2, "per": "1h"})
    records = [send(channel, Message(subject=f"m{number}", body=f"body {number}")) for number in range(5)]
    assert [record.status for record in records] == ["delivered", "delivered", "held", "held", "held"]
    assert [line["subject"] for line in lines(channel)] == ["m0", "m1"]
    assert held.held_counts() == {"ops": 3}

    assert held.flush_held(channels=[channel]) == []  # the hour is not over: still held
    (digest,) = held.flush_held(channels=[channel], now=later(61))
    assert digest.status == "delivered"
    last = lines(channel)[-1]
    assert last["subject"] == "3 notifications on ops: m2"
    assert last["body"].splitlines() == ["• m2", "  body 2", "• m3", "  body 3", "• m4", "  body 4"]
    assert len(last["metadata"]["digest"]) == 3
    # Five messages, five records, plus the digest's: nothing lost, nothing counted twice.
    assert statuses() == ["delivered", "delivered", "digested", "digested", "digested", "delivered"]
    with session_scope() as session:
        responses = session.scalars(
            select(NotificationDelivery.response).where(NotificationDelivery.status == "digested")
        ).all()
    assert set(responses) == {f"sent in delivery {digest.id}"}
    assert held.held_counts() == {}
    assert held.flush_held(channels=[channel], now=later(200)) == []


def test_a_digest_channel_sends_once_per_interval(store_url: str) -> None:
    channel = OutboxChannel("digest", digest={"interval": "10m"})
    for number in range(3):
        assert send(channel, Message(subject=f"s{number}", body="", severity="warning")).status == "held"
    send(channel, Message(subject="worst", body="", severity="critical"))
    assert lines(channel) == []
    assert held.flush_held(channels=[channel], now=later(9)) == []
    (digest,) = held.flush_held(channels=[channel], now=later(11))
    (line,) = lines(channel)
    assert line["subject"] == "4 notifications on digest: s0"
    # The digest carries the worst severity of what it holds.
    assert (len(line["metadata"]["digest"]), digest.subject, line["severity"]) == (
        4,
        line["subject"],
        "critical",
    )
    assert held.flush_held(channels=[channel], now=later(30)) == []
    # One message held alone goes out as itself, not wrapped in a digest of one.
    send(channel, Message(subject="alone", body="just me"))
    held.flush_held(channels=[channel], now=later(11))
    assert lines(channel)[-1]["subject"] == "alone"


def test_a_notification_storm_is_bounded_by_the_throttle(store_url: str) -> None:
    """150 messages in a burst to a channel allowing one a minute: one sent, one digest of the rest."""
    channel = OutboxChannel("storm", throttle={"max_messages": 1, "per": "1m"})
    for number in range(150):
        send(channel, Message(subject=f"run {number} failed", body=""))
    assert len(lines(channel)) == 1
    held.flush_held(channels=[channel], now=later(2))
    received = lines(channel)
    assert len(received) == 2
    assert received[1]["subject"] == "149 notifications on storm: run 1 failed"
    counted = statuses()
    assert (counted.count("delivered"), counted.count("digested"), len(counted)) == (2, 149, 151)


def test_a_failing_digest_keeps_its_messages_for_the_next_flush(store_url: str, monkeypatch) -> None:
    monkeypatch.setenv("DIGEST_SECRET", "s")
    port = free_port()
    channel = WebhookChannel(
        "hook",
        url=f"http://127.0.0.1:{port}/in",
        secret_env="DIGEST_SECRET",
        digest={"interval": "1m"},
        retry=FAST_RETRY,
    )
    for number in range(3):
        send(channel, Message(subject=f"h{number}", body=""))
    assert held.flush_held(channels=[channel], now=later(2)) == []  # nobody listens on the port
    assert held.held_counts() == {"hook": 3}
    assert statuses() == ["held", "held", "held", "failed"]  # the failure is recorded, not silent

    received: list[dict] = []

    async def receive(request: Request) -> PlainTextResponse:
        received.append(json.loads(await request.body()))
        return PlainTextResponse("ok")

    served = ServedApp(Starlette(routes=[Route("/in", receive, methods=["POST"])]), port=port)
    try:
        (digest,) = held.flush_held(channels=[channel], now=later(2))
    finally:
        served.stop()
    assert received[0]["subject"] == "3 notifications on hook: h0"
    assert held.held_counts() == {}
    assert statuses() == ["digested", "digested", "digested", "failed", "delivered"]


def test_two_flushers_send_one_digest(store_url: str) -> None:
    channel = OutboxChannel("shared", digest={"interval": "1m"})
    for number in range(20):
        send(channel, Message(subject=f"x{number}", body=""))
    results: list[list] = []
    errors: list[BaseException] = []

    def flush() -> None:
        try:
            results.append(held.flush_channel(None, channel, later(2)))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=flush) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sum(len(result) for result in results) == 1
    assert len(lines(channel)) == 1
    assert held.held_counts() == {}


def test_a_digest_a_crash_interrupted_is_sent_at_the_next_flush(store_url: str) -> None:
    channel = OutboxChannel("crashy", digest={"interval": "1m"})
    for number in range(2):
        send(channel, Message(subject=f"c{number}", body=""))
    from orchestration.store.models import HeldNotification

    with session_scope() as session:
        ids = list(session.scalars(select(HeldNotification.id)))
    # A flusher claimed them ten minutes ago and died before sending.
    assert held._claim_digest(
        None, ids, "digest:crashy:interrupted", datetime.now(UTC) - timedelta(minutes=10)
    )
    (digest,) = held.flush_channel(None, channel)
    assert lines(channel)[0]["subject"] == "2 notifications on crashy: c0"
    assert digest.dedupe_key == "digest:crashy:interrupted"
    assert held.held_counts() == {}


def test_throttle_and_digest_declarations_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "channels.yaml"
    path.write_text(
        "channels:\n"
        "  a: {kind: outbox, throttle: {max_messages: 0, per: 1 hour}}\n"
        "  b: {kind: outbox, digest: {every: 10m}}\n",
        encoding="utf-8",
    )
    with pytest.raises(SpecError) as caught:
        load_channels(path)
    text = str(caught.value)
    assert "channels.a.throttle.max_messages: Input should be greater than or equal to 1" in text
    assert "channels.a.throttle.per: '1 hour' is not a duration" in text
    assert "channels.b.digest.interval: Field required" in text
    assert "channels.b.digest.every: unknown field" in text


def test_the_digest_sensor_and_the_cli_flush_what_is_due(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "channels.yaml"
    path.write_text(
        "channels:\n  quiet: {kind: outbox, digest: {interval: 1s}}\n  plain: {kind: outbox}\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("JUNCTION_CHANNELS_FILE", str(path))
    reset_settings_cache()
    assert send("quiet", Message(subject="q1", body="")).status == "held"
    send("quiet", Message(subject="q2", body=""))
    threading.Event().wait(1.1)
    result = notification_digests(dg.build_sensor_context())
    assert result.skip_message == "1 digest(s) sent; messages still held: none"
    assert lines(load_channels()["quiet"])[0]["subject"] == "2 notifications on quiet: q1"

    send("quiet", Message(subject="q3", body=""))
    threading.Event().wait(1.1)
    answer = CliRunner().invoke(cli, ["notifications", "flush", "--channel", "quiet"])
    assert answer.exit_code == 0, answer.output
    assert answer.output.splitlines() == ["quiet: digest delivered (q3)", "1 digest(s) sent"]
    unknown = CliRunner().invoke(cli, ["notifications", "flush", "--channel", "nope"])
    assert unknown.exit_code == 2 and "no channel named nope" in unknown.output
