"""`junction alerts list|rules|test|silence|silences|expire` on a real store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestration.cli import cli
from orchestration.kernel import audit
from orchestration.settings import reset_settings_cache
from resources.notifications import load_channels


@pytest.fixture
def files(store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    channels = tmp_path / "channels.yaml"
    channels.write_text(
        "channels:\n  ops: {kind: outbox}\n  down: {kind: webhook, url: 'http://127.0.0.1:9/x', secret_env: NOPE, retry: {max_attempts: 1}}\n",
        encoding="utf-8",
    )
    alerts = tmp_path / "alerts.yaml"
    alerts.write_text(
        "rules:\n"
        "  quality:\n"
        "    signal: {kind: quality_score, pipeline: flights}\n"
        "    labels: {pipeline: flights}\n"
        "    group_by: [rule, pipeline]\n"
        "    channels: [ops]\n"
        "  paging:\n"
        "    signal: {kind: run_failure}\n"
        "    channels: [ops, down]\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("JUNCTION_CHANNELS_FILE", str(channels))
    monkeypatch.setenv("JUNCTION_ALERTS_FILE", str(alerts))
    reset_settings_cache()
    return alerts


def run(*args: str):
    return CliRunner().invoke(cli, ["alerts", *args])


def test_rules_and_an_empty_list(files: Path) -> None:
    rules = run("rules")
    assert rules.exit_code == 0, rules.output
    assert "quality  quality_score  warning   ops" in rules.output
    assert "rule, pipeline" in rules.output and "30s/5m/4h" in rules.output
    assert run("list").output == "no alerts\n"
    assert json.loads(run("list", "--json").output) == []


def test_test_sends_the_rule_s_message_to_its_channels(files: Path) -> None:
    answer = run("test", "quality")
    assert answer.exit_code == 0, answer.output
    assert answer.output.startswith("ops: delivered")
    (line,) = [json.loads(text) for text in load_channels()["ops"].path.read_text().splitlines()]
    assert line["subject"] == "[FIRING:1] quality (pipeline=flights)"
    assert "TEST of rule quality" in line["body"]
    failing = run("test", "paging")
    assert failing.exit_code == 1
    assert "down: FAILED" in failing.output and "NOPE" in failing.output
    unknown = run("test", "nope")
    assert unknown.exit_code == 2 and "no rule 'nope' (declared: paging, quality)" in unknown.output


def test_silence_silences_and_expire(files: Path) -> None:
    created = run(
        "silence",
        "--match",
        "rule=quality",
        "--match",
        "pipeline=~fli.*",
        "--for",
        "2h",
        "--comment",
        "reload",
    )
    assert created.exit_code == 0, created.output
    silence_id = created.output.split()[1]
    listed = run("silences")
    assert (
        silence_id in listed.output
        and "active" in listed.output
        and "rule=quality, pipeline=~fli.*" in listed.output
    )
    assert run("expire", silence_id).output == f"silence {silence_id} expired\n"
    assert run("silences").output == "no silences\n"
    assert "expired" in run("silences", "--all").output
    assert sorted(e.action for e in audit.query(target=silence_id)) == [
        "alerts.silence.create",
        "alerts.silence.expire",
    ]


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--match", "rule", "--for", "2h", "--comment", "c"], "write label=value"),
        (["--match", "rule=~(", "--for", "2h", "--comment", "c"], "invalid regular expression"),
        (["--match", "rule=x", "--for", "ages", "--comment", "c"], "'ages' is not a duration"),
        (["--match", "rule=x", "--for", "2h", "--comment", " "], "needs a comment"),
    ],
)
def test_bad_silences_are_refused(files: Path, args: list[str], reason: str) -> None:
    answer = run("silence", *args)
    assert answer.exit_code == 2 and reason in answer.output


def test_every_command_has_help() -> None:
    for command in ("list", "rules", "test", "silence", "silences", "expire"):
        answer = run(command, "--help")
        assert answer.exit_code == 0 and "Usage:" in answer.output
