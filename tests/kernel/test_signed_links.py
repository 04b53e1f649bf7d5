"""Signed link tokens: origin, purpose and age are proven; anything else is refused."""

from __future__ import annotations

import stat
import time

import pytest

from orchestration.kernel import signed_links
from orchestration.kernel.signed_links import InvalidLink
from orchestration.settings import JunctionSettings


@pytest.fixture
def settings(tmp_path, monkeypatch):
    monkeypatch.delenv("JUNCTION_SECRET_KEY", raising=False)
    return JunctionSettings(home=tmp_path / "home")


def test_round_trip_and_generated_key_file(settings):
    token = signed_links.sign("approval", {"request": 7, "decision": "approve"}, settings=settings)
    assert signed_links.verify("approval", token, max_age_s=60, settings=settings) == {
        "request": 7,
        "decision": "approve",
    }
    mode = stat.S_IMODE(settings.secret_key_file.stat().st_mode)
    assert mode == 0o600
    # The same key is read back by another process's settings object.
    again = JunctionSettings(home=settings.home)
    assert signed_links.verify("approval", token, settings=again)["request"] == 7


def test_other_purpose_altered_and_expired_tokens_are_refused(settings):
    token = signed_links.sign("approval", {"request": 7}, settings=settings)
    with pytest.raises(InvalidLink, match="not valid"):
        signed_links.verify("report", token, settings=settings)
    altered = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    with pytest.raises(InvalidLink, match="not valid"):
        signed_links.verify("approval", altered, settings=settings)
    time.sleep(2.1)  # itsdangerous counts whole seconds; expired means older than max_age
    with pytest.raises(InvalidLink, match="expired"):
        signed_links.verify("approval", token, max_age_s=1, settings=settings)


def test_environment_key_wins_and_other_keys_are_refused(settings, monkeypatch):
    permanent = signed_links.sign_permanent("report", {"run_id": "abc"}, settings=settings)
    assert signed_links.verify_permanent("report", permanent, settings=settings) == {"run_id": "abc"}
    monkeypatch.setenv("JUNCTION_SECRET_KEY", "another-key-entirely")
    with pytest.raises(InvalidLink):
        signed_links.verify_permanent("report", permanent, settings=settings)
    token = signed_links.sign_permanent("report", {"run_id": "abc"}, settings=settings)
    assert signed_links.verify_permanent("report", token, settings=settings) == {"run_id": "abc"}
