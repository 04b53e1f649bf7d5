"""`/gateway/v1/alerts` and `/gateway/v1/silences`: scopes, problem+json answers, audit entries."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest
from support import bearer

from orchestration.kernel import audit
from sensors.alerts.evaluation import evaluate_rules
from sensors.alerts.rules import load_alert_rules
from sensors.alerts.signals import SignalContext

RULES = """
defaults: {group_wait: 0s}
rules:
  failed_runs:
    signal: {kind: run_failure}
    group_by: [rule, job]
    channels: [ops]
"""


@pytest.fixture
def alerting(gateway, make_key, tmp_path: Path, monkeypatch):
    channels = tmp_path / "channels.yaml"
    channels.write_text("channels:\n  ops: {kind: outbox}\n", encoding="utf-8")
    alerts = tmp_path / "alerts.yaml"
    alerts.write_text(RULES, encoding="utf-8")
    client = gateway(channels_file=channels, alerts_file=alerts)
    reader = bearer(make_key("alert-reader", "alerts:read"))
    silencer = bearer(make_key("alert-silencer", "alerts:read", "alerts:silence"))
    return client, reader, silencer, alerts


def test_alerts_and_rules_are_listed_for_alerts_read(alerting, monkeypatch) -> None:
    client, reader, _, alerts = alerting
    monkeypatch.setenv("JUNCTION_CHANNELS_FILE", str(alerts.parent / "channels.yaml"))
    with dg.instance_for_test() as instance:
        instance.add_run(
            dg.DagsterRun(job_name="nightly", run_id=str(uuid.uuid4()), status=dg.DagsterRunStatus.FAILURE)
        )
        evaluate_rules(load_alert_rules(alerts), SignalContext(instance=instance, now=datetime.now(UTC)))
    listed = client.get("/v1/alerts", headers=reader).json()["alerts"]
    assert [(a["rule"], a["status"], a["labels"]["job"]) for a in listed] == [
        ("failed_runs", "firing", "nightly")
    ]
    assert client.get("/v1/alerts", params={"status": "resolved"}, headers=reader).json()["alerts"] == []
    rules = client.get("/v1/alerts/rules", headers=reader).json()
    (rule,) = rules["rules"]
    assert (rule["name"], rule["group_by"], rule["group_wait"], rule["repeat_interval"]) == (
        "failed_runs",
        ["rule", "job"],
        "0s",
        "4h",
    )
    assert client.get("/v1/alerts").status_code == 401


def test_a_silence_is_created_listed_and_expired_and_each_change_is_audited(alerting) -> None:
    client, reader, silencer, _ = alerting
    body = {
        "matchers": [{"label": "job", "op": "=", "value": "nightly"}],
        "duration": "2h",
        "comment": "deploy",
    }
    assert client.post("/v1/silences", json=body, headers=reader).status_code == 403
    created = client.post("/v1/silences", json=body, headers=silencer)
    assert created.status_code == 201, created.text
    silence = created.json()
    assert created.headers["location"].endswith(f"/v1/silences/{silence['id']}")
    assert (silence["state"], silence["created_by"], silence["comment"]) == (
        "active",
        "alert-silencer",
        "deploy",
    )
    assert [s["id"] for s in client.get("/v1/silences", headers=reader).json()["silences"]] == [silence["id"]]
    expired = client.delete(f"/v1/silences/{silence['id']}", headers=silencer)
    assert expired.json()["state"] == "expired"
    assert client.get("/v1/silences", headers=reader).json()["silences"] == []
    assert (
        len(client.get("/v1/silences", params={"include_expired": True}, headers=reader).json()["silences"])
        == 1
    )
    actions = sorted(entry.action for entry in audit.query(target=silence["id"]))  # newest first
    assert actions == ["alerts.silence.create", "alerts.silence.expire"]


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (
            {
                "matchers": [{"label": "job", "op": "=~", "value": "(unclosed"}],
                "duration": "1h",
                "comment": "c",
            },
            "invalid regular expression",
        ),
        (
            {"matchers": [{"label": "job", "op": "=", "value": "x"}], "duration": "forever", "comment": "c"},
            "is not a duration",
        ),
        ({"matchers": [{"label": "job", "op": "=", "value": "x"}], "comment": "c"}, "a duration or an end"),
        (
            {"matchers": [{"label": "job", "op": "=", "value": "x"}], "duration": "400d", "comment": "c"},
            "at most 366 days",
        ),
    ],
)
def test_bad_silences_are_422_problems(alerting, body: dict, detail: str) -> None:
    client, _, silencer, _ = alerting
    answer = client.post("/v1/silences", json=body, headers=silencer)
    assert answer.status_code == 422
    assert answer.headers["content-type"] == "application/problem+json"
    assert detail in answer.json()["detail"]


def test_an_unknown_silence_is_404(alerting) -> None:
    client, reader, silencer, _ = alerting
    assert client.get("/v1/silences/nope", headers=reader).status_code == 404
    assert client.delete("/v1/silences/nope", headers=silencer).json()["status"] == 404
