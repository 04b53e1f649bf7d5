"""Alert rules end to end on real storage: a Dagster instance (runs, materializations, checks) and the
platform store on both backends; notifications land in outbox channels, read back line by line.

Evaluations are driven with an explicit `now`, so group_wait, group_interval, repeat_interval and `for`
are tested without waiting for them.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest
from sqlalchemy import update

from orchestration.kernel.spec_errors import SpecError
from orchestration.settings import reset_settings_cache
from orchestration.store import session_scope
from orchestration.store.models import AlertGroup
from resources.notifications import load_channels
from sensors.alerts.evaluation import current_alerts, evaluate_rules
from sensors.alerts.rules import load_alert_rules
from sensors.alerts.signals import SignalContext
from sensors.alerts.silences import create_silence, expire_silence, parse_matcher

CHANNELS = """
channels:
  ops: {kind: outbox}
  pager: {kind: outbox}
"""


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        yield test_instance


@pytest.fixture
def files(store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    channels = tmp_path / "channels.yaml"
    channels.write_text(CHANNELS, encoding="utf-8")
    monkeypatch.setenv("JUNCTION_CHANNELS_FILE", str(channels))
    alerts = tmp_path / "alerts.yaml"
    monkeypatch.setenv("JUNCTION_ALERTS_FILE", str(alerts))
    reset_settings_cache()

    def write(text: str):
        alerts.write_text(text, encoding="utf-8")
        return load_alert_rules(alerts)

    return write


def outbox(channel: str = "ops") -> list[dict]:
    path = load_channels()[channel].path
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def failed_run(instance: dg.DagsterInstance, job: str, **tags: str) -> str:
    """A failed run in the run storage, as the run worker leaves one."""
    run_id = str(uuid.uuid4())
    instance.add_run(
        dg.DagsterRun(job_name=job, run_id=run_id, status=dg.DagsterRunStatus.FAILURE, tags=tags)
    )
    return run_id


def at(instance: dg.DagsterInstance, seconds: float, **extra) -> SignalContext:
    return SignalContext(instance=instance, now=datetime.now(UTC) + timedelta(seconds=seconds), **extra)


FAILURES = """
defaults: {group_wait: 0s, group_interval: 5m, repeat_interval: 4h}
rules:
  failed_runs:
    signal: {kind: run_failure, window: 15m}
    group_by: [rule, job]
    severity: error
    summary: "run {{ labels.run_id }} of {{ labels.job }} failed"
    channels: [ops, pager]
"""


def test_failed_runs_are_grouped_and_each_group_notified_once_per_channel(files, instance) -> None:
    rules = files(FAILURES)
    for _ in range(5):
        failed_run(instance, "nightly")
    failed_run(instance, "hourly")
    first = evaluate_rules(rules, at(instance, 0))
    assert (first.firing, len(first.sent)) == (6, 4)  # two groups, two channels each
    subjects = sorted(line["subject"] for line in outbox())
    assert subjects == ["[FIRING:1] failed_runs (job=hourly)", "[FIRING:5] failed_runs (job=nightly)"]
    assert len(outbox("pager")) == 2
    nightly = next(line for line in outbox() if "nightly" in line["subject"])
    assert nightly["severity"] == "error" and nightly["facts"]["job"] == "nightly"
    assert nightly["body"].count("• run ") == 5

    # Nothing changed: nothing more is sent, however often it is evaluated.
    for seconds in (30, 60, 120):
        assert evaluate_rules(rules, at(instance, seconds)).sent == []
    # A new failure changes the nightly group: notified again at group_interval, not before.
    failed_run(instance, "nightly")
    assert evaluate_rules(rules, at(instance, 200)).sent == []
    again = evaluate_rules(rules, at(instance, 301))
    assert [record.subject for record in again.sent] == ["[FIRING:6] failed_runs (job=nightly)"] * 2


def test_an_unchanged_firing_group_is_repeated_and_resolved_once(files, instance) -> None:
    rules = files(
        FAILURES.replace("repeat_interval: 4h", "repeat_interval: 10m").replace("window: 15m", "window: 1h")
    )
    failed_run(instance, "nightly")
    assert len(evaluate_rules(rules, at(instance, 0)).sent) == 2
    assert evaluate_rules(rules, at(instance, 599)).sent == []
    assert len(evaluate_rules(rules, at(instance, 601)).sent) == 2  # the reminder
    # The run leaves the window: the alert resolves and one resolve notification goes out.
    resolved = evaluate_rules(rules, at(instance, 3601 + 301))
    assert resolved.resolved == 1
    assert [line["subject"] for line in outbox()][-1] == "[RESOLVED] failed_runs (job=nightly)"
    assert outbox()[-1]["resolved"] is True
    assert evaluate_rules(rules, at(instance, 3601 + 1000)).sent == []
    (alert,) = current_alerts()
    assert alert["status"] == "resolved"


def test_group_wait_gathers_the_first_alerts_into_one_notification(files, instance) -> None:
    rules = files(FAILURES.replace("group_wait: 0s", "group_wait: 1m"))
    failed_run(instance, "nightly")
    assert evaluate_rules(rules, at(instance, 0)).sent == []
    failed_run(instance, "nightly")
    assert evaluate_rules(rules, at(instance, 30)).sent == []
    sent = evaluate_rules(rules, at(instance, 61)).sent
    assert [record.subject for record in sent] == ["[FIRING:2] failed_runs (job=nightly)"] * 2


def test_for_keeps_an_alert_pending_until_the_condition_has_held_long_enough(files, instance) -> None:
    rules = files(FAILURES.replace("severity: error", "severity: error\n    for: 5m"))
    failed_run(instance, "nightly")
    first = evaluate_rules(rules, at(instance, 0))
    assert (first.pending, first.firing, first.sent) == (1, 0, [])
    assert current_alerts()[0]["status"] == "pending"
    assert evaluate_rules(rules, at(instance, 299)).sent == []
    fired = evaluate_rules(rules, at(instance, 301))
    assert (fired.firing, len(fired.sent)) == (1, 2)


def test_a_storm_of_failures_is_one_notification_per_group_per_interval(files, instance) -> None:
    """1,000 failing runs within a minute: one message per group and channel, then one per interval."""
    rules = files(FAILURES.replace("group_by: [rule, job]", "group_by: [rule]"))
    for number in range(1000):
        failed_run(instance, f"job_{number % 7}")
        if number in (0, 499):
            evaluate_rules(rules, at(instance, number * 0.06))
    evaluate_rules(rules, at(instance, 60))
    assert [line["subject"] for line in outbox()] == ["[FIRING:1] failed_runs"]
    evaluate_rules(rules, at(instance, 301))
    assert [line["subject"] for line in outbox()][-1] == "[FIRING:1000] failed_runs"
    assert len(outbox()) == len(outbox("pager")) == 2
    assert "… and 980 more firing" in outbox()[-1]["body"]


def test_a_silence_mutes_matching_alerts_until_it_is_expired(files, instance) -> None:
    rules = files(FAILURES)
    failed_run(instance, "nightly")
    failed_run(instance, "hourly")
    silence = create_silence(
        [parse_matcher("job=nightly")], duration=timedelta(hours=2), comment="maintenance", created_by="test"
    )
    result = evaluate_rules(rules, at(instance, 0))
    assert (result.firing, result.muted) == (2, 1)
    assert [line["subject"] for line in outbox()] == ["[FIRING:1] failed_runs (job=hourly)"]
    muted = next(alert for alert in current_alerts() if alert["labels"]["job"] == "nightly")
    assert muted["muted_by"] == silence.id
    expire_silence(silence.id)
    after = evaluate_rules(rules, at(instance, 10))
    assert [record.subject for record in after.sent] == ["[FIRING:1] failed_runs (job=nightly)"] * 2


@pytest.mark.parametrize(
    ("matcher", "mutes"),
    [("job=~night.*", True), ("job!~night.*", False), ("job!=nightly", False), ("team=data", False)],
)
def test_silence_matchers(matcher: str, mutes: bool) -> None:
    assert parse_matcher(matcher).matches({"job": "nightly", "rule": "r"}) is mutes


def test_a_firing_critical_alert_inhibits_the_warnings_of_its_pipeline(files, instance) -> None:
    rules = files(
        """
defaults: {group_wait: 0s}
rules:
  broken:
    signal: {kind: run_failure}
    severity: critical
    labels: {pipeline: flights}
    channels: [ops]
  degraded:
    signal: {kind: run_failure}
    severity: warning
    labels: {pipeline: flights}
    channels: [ops]
  elsewhere:
    signal: {kind: run_failure}
    severity: warning
    labels: {pipeline: stations}
    channels: [ops]
inhibit:
  - source: {severity: critical}
    target: {severity: warning}
    equal: [pipeline]
"""
    )
    failed_run(instance, "flights_job")
    result = evaluate_rules(rules, at(instance, 0))
    assert (result.firing, result.muted) == (3, 1)
    assert sorted(line["subject"] for line in outbox()) == ["[FIRING:1] broken", "[FIRING:1] elsewhere"]
    assert {a["rule"]: a["muted_by"] for a in current_alerts()}["degraded"] == "inhibited"


def test_a_crash_between_sending_and_recording_sends_nothing_twice(files, instance) -> None:
    rules = files(FAILURES)
    failed_run(instance, "nightly")
    evaluate_rules(rules, at(instance, 0))
    # The daemon died after the sends, before the group's state moved on.
    with session_scope() as session:
        session.execute(update(AlertGroup).values(sequence=0, last_notified_at=None, notified=[]))
    again = evaluate_rules(rules, at(instance, 5))
    assert again.sent == []  # the same notification number: each channel's claim says "already sent"
    assert len(outbox()) == len(outbox("pager")) == 1


def test_freshness_quality_quarantine_and_check_signals(files, instance) -> None:
    rules = files(
        """
defaults: {group_wait: 0s}
rules:
  fresh:
    signal: {kind: freshness, asset: flights, within: 1h}
    summary: "flights: {{ detail }}"
    channels: [ops]
  quality:
    signal: {kind: quality_score, pipeline: flights, score: min}
    channels: [ops]
  quarantine:
    signal: {kind: quarantine_share, pipeline: flights, above: 0.1}
    channels: [ops]
  checks:
    signal: {kind: check_failure, severity: WARN}
    channels: [ops]
"""
    )

    @dg.asset(name="flights_staged")
    def staged() -> dg.MaterializeResult:
        return dg.MaterializeResult(
            metadata={
                "quality_score_rows": 0.7,
                "quality_score_checks": 0.95,
                "rows_read": 100,
                "rows_quarantined": 30,
            }
        )

    @dg.asset(name="flights", deps=[staged])
    def published() -> None:
        return None

    @dg.asset_check(asset=published, name="rows_present")
    def rows_present() -> dg.AssetCheckResult:
        return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.WARN)

    checks = [dg.AssetCheckKey(dg.AssetKey("flights"), "rows_present")]
    before = evaluate_rules(rules, at(instance, 0, asset_check_keys=checks))
    assert {a["rule"]: a["summary"] for a in current_alerts()} == {"fresh": "flights: never materialized"}
    assert before.firing == 1
    dg.materialize([staged, published], instance=instance)
    dg.materialize([published], instance=instance, selection=[published], raise_on_error=False)
    dg.materialize([published, rows_present], instance=instance, raise_on_error=False)
    after = evaluate_rules(rules, at(instance, 10, asset_check_keys=checks))
    state = {a["rule"]: a for a in current_alerts()}
    assert state["fresh"]["status"] == "resolved"
    assert (state["quality"]["status"], state["quality"]["value"]) == ("firing", 0.7)
    assert (state["quarantine"]["status"], state["quarantine"]["value"]) == ("firing", 0.3)
    assert state["checks"]["labels"] == {
        "rule": "checks",
        "severity": "warning",
        "asset": "flights",
        "check": "rows_present",
        "check_severity": "WARN",
    }
    assert after.errors == {}


def test_a_signal_that_fails_is_reported_and_resolves_nothing(files, instance, monkeypatch) -> None:
    rules = files(
        """
defaults: {group_wait: 0s}
rules:
  lag:
    signal: {kind: stream_lag, stream: no_such_stream}
    channels: [ops]
  failed_runs:
    signal: {kind: run_failure}
    channels: [ops]
"""
    )
    failed_run(instance, "nightly")
    result = evaluate_rules(rules, at(instance, 0))
    assert "lag" in result.errors and "no_such_stream" in result.errors["lag"]
    assert result.firing == 1  # the other rule was evaluated
    assert "signal errors: lag:" in result.summary()


def test_a_bad_alerts_file_names_file_field_and_reason(files) -> None:
    with pytest.raises(SpecError) as caught:
        files("defaults: {group_wait: soon}\nrules: {}\n")
    assert str(caught.value).endswith(
        "alerts.yaml: defaults.group_wait: 'soon' is not a duration (90m, 12h, 2d, 1w)"
    )


def test_rule_errors_are_all_reported(files) -> None:
    with pytest.raises(SpecError) as caught:
        files(
            """
rules:
  a:
    signal: {kind: weather}
    channels: [ops]
  b:
    signal: {kind: run_failure, windoe: 5m}
    channels: [ops, nobody]
  c:
    signal: {kind: freshness, asset: x, within: 1h}
    condition: {field: value, op: bigger, value: 1}
    summary: "{{ unclosed"
    channels: [ops]
  d:
    signal: {kind: run_failure}
    channels: []
    labels: {rule: mine}
"""
        )
    lines = [line.split("alerts.yaml: ", 1)[1] for line in str(caught.value).splitlines()]
    assert lines[0].startswith(
        "rules.a.signal.kind: must be one of: cache_hit_rate, check_failure, dead_letters"
    )
    assert "rules.b.signal.windoe: unknown field" in lines
    assert "rules.c.condition.op: " in "\n".join(lines)
    assert any(line.startswith("rules.c.summary: template syntax error") for line in lines)
    assert any(line.startswith("rules.d.channels: List should have at least 1 item") for line in lines)
    assert any(line.startswith("rules.d.labels: label 'rule'") for line in lines)
    assert not any("nobody" in line for line in lines)  # b stopped at its signal


def test_an_unknown_channel_is_named(files) -> None:
    with pytest.raises(
        SpecError, match=r"rules.a.channels\[1\]: unknown channel 'nobody' \(declared: ops, pager\)"
    ):
        files("rules:\n  a: {signal: {kind: run_failure}, channels: [ops, nobody]}\n")


def test_the_shipped_alerts_file_loads_with_the_shipped_channels(store_url: str) -> None:
    from orchestration.settings import PROJECT_ROOT

    rules = load_alert_rules(
        PROJECT_ROOT / "resources" / "alerts.yaml",
        set(load_channels(PROJECT_ROOT / "resources" / "channels.yaml")),
    )
    assert {"flights_quality", "flights_freshness"} <= set(rules.rules)
    quality = rules.rules["flights_quality"]
    assert (quality.signal.kind, quality.spec.channels) == ("quality_score", ["alerts"])
    assert rules.rules["flights_freshness"].signal.kind == "freshness"


def test_the_sensor_evaluates_the_rules_file(files, instance) -> None:
    from sensors.alerts.sensor import alert_evaluation

    files(FAILURES)
    failed_run(instance, "nightly")
    result = alert_evaluation(dg.build_sensor_context(instance=instance))
    assert result.skip_message.startswith(
        "1 firing (0 muted), 0 pending, 0 resolved now; 2 notification(s) sent"
    )
    assert outbox()[0]["subject"] == "[FIRING:1] failed_runs (job=nightly)"
