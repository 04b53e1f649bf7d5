"""Scopes, principals and API keys (the store-backed parts on SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select, text

from orchestration.cli import cli
from orchestration.kernel.audit import query, verify_chain
from orchestration.kernel.principals import (
    LAST_USED_RESOLUTION,
    ApiKeyError,
    AuthenticationError,
    Principal,
    Scope,
    ScopeError,
    authenticate,
    create_api_key,
    ensure_local_admin_key,
    get_api_key,
    list_api_keys,
    parse_scope,
    revoke_api_key,
)
from orchestration.store.db import get_engine, session_scope
from orchestration.store.models import ApiKey

# ---------------------------------------------------------------------------------------------------
# Scope grammar (no store)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("admin", Scope("admin")),
        ("runs:launch", Scope("runs", "launch")),
        ("runs:read", Scope("runs", "read")),
        ("events:publish:orders", Scope("events", "publish", "orders")),
        ("events:publish:*", Scope("events", "publish", "*")),
        ("events:publish:Orders.v2/eu-west_1", Scope("events", "publish", "Orders.v2/eu-west_1")),
        ("approvals:decide", Scope("approvals", "decide")),
        ("runs:*", Scope("runs", "*")),
        ("data-quality:run_checks", Scope("data-quality", "run_checks")),
    ],
)
def test_valid_scopes_parse(text: str, expected: Scope) -> None:
    assert parse_scope(text) == expected
    assert parse_scope(text).text == text


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty scope"),
        ("runs", "expected area:action"),
        ("runs:", "empty part"),
        (":launch", "empty part"),
        ("events::orders", "empty part"),
        ("events:publish:", "empty part"),
        ("a:b:c:d", "too many parts"),
        ("Runs:launch", "area 'Runs'"),
        ("runs:Launch", "action 'Launch'"),
        ("runs:la unch", "action"),
        ("1runs:launch", "area"),
        ("*:launch", "area"),
        ("runs:launch:or ders", "resource"),
        ("runs:launch:orders*", "resource"),
        ("runs:launch:../x", "resource"),
        ("runs:*:orders", "wildcard action takes no resource"),
        ("admin:all", "admin takes no action"),
        ("ADMIN", "expected area:action"),
        ("runs:" + "a" * 300, "longer than 200"),
    ],
)
def test_malformed_scopes_are_refused_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_scope(text)
    assert isinstance(caught.value, ScopeError)
    assert reason in str(caught.value)


def _principal(*scopes: str) -> Principal:
    return Principal(
        name="p", groups=frozenset(), scopes=tuple(parse_scope(s) for s in scopes), via="api_key:test"
    )


@pytest.mark.parametrize(
    ("granted", "required", "allowed"),
    [
        (["admin"], "runs:launch", True),
        (["admin"], "events:publish:orders", True),
        (["admin"], "admin", True),
        (["runs:launch"], "admin", False),
        (["runs:launch"], "runs:launch", True),
        (["runs:launch"], "runs:read", False),
        (["runs:read"], "runs:launch", False),
        (["runs:launch"], "events:launch", False),
        (["runs:launch"], "runs:launch:orders", True),
        (["events:publish"], "events:publish:orders", True),
        (["events:publish:*"], "events:publish:orders", True),
        (["events:publish:*"], "events:publish", True),
        (["events:publish:orders"], "events:publish:orders", True),
        (["events:publish:orders"], "events:publish:payments", False),
        (["events:publish:orders"], "events:publish", False),
        (["events:publish:orders"], "events:publish:*", False),
        (["events:publish:orders"], "events:publish:Orders", False),
        (["events:*"], "events:publish:orders", True),
        (["events:*"], "events:subscribe", True),
        (["events:*"], "runs:launch", False),
        (["events:publish"], "events:*", False),
        (["runs:read", "approvals:decide"], "approvals:decide", True),
        ([], "runs:read", False),
    ],
)
def test_scope_grants(granted: list[str], required: str, allowed: bool) -> None:
    assert _principal(*granted).allows(required) is allowed


def test_allows_refuses_a_malformed_requirement() -> None:
    with pytest.raises(ValueError, match="too many parts"):
        _principal("admin").allows("a:b:c:d")


# ---------------------------------------------------------------------------------------------------
# API keys (both store backends)


def test_create_and_authenticate(store_url: str) -> None:
    info, token = create_api_key(
        "ci-deployer",
        scopes=["runs:launch", "events:publish:orders", "runs:launch"],
        principal="ci",
        groups=["deployers", "ops"],
        created_by="alice",
    )
    assert token.startswith(f"jk_{info.id}_")
    assert (info.name, info.principal, info.scopes, info.groups) == (
        "ci-deployer",
        "ci",
        ("runs:launch", "events:publish:orders"),
        ("deployers", "ops"),
    )
    principal = authenticate(token)
    assert principal.name == "ci"
    assert principal.groups == frozenset({"deployers", "ops"})
    assert principal.via == "api_key:ci-deployer"
    assert principal.allows("runs:launch") and principal.allows("events:publish:orders")
    assert not principal.allows("events:publish:payments") and not principal.allows("admin")


def test_principal_defaults_to_the_key_name(store_url: str) -> None:
    _info, token = create_api_key("reporting", scopes=["runs:read"])
    assert authenticate(token).name == "reporting"


def test_only_a_salted_hash_is_stored(store_url: str) -> None:
    info, token = create_api_key("k1", scopes=["runs:read"])
    secret = token.split("_", 2)[2]
    with get_engine().connect() as connection:
        row = (
            connection.execute(text("SELECT * FROM api_keys WHERE id = :id"), {"id": info.id})
            .mappings()
            .one()
        )
    stored = " ".join(str(value) for value in row.values())
    assert secret not in stored and token not in stored
    assert row["secret_hash"] != secret and len(row["secret_hash"]) == 64 and row["salt"]
    _info2, token2 = create_api_key("k2", scopes=["runs:read"])
    with get_engine().connect() as connection:
        salts = connection.execute(text("SELECT salt FROM api_keys")).scalars().all()
    assert len(set(salts)) == 2


@pytest.mark.parametrize(
    "token",
    [
        "",
        "jk_",
        "not-a-key",
        "jk_0123456789abcdef_short",
        "xx_0123456789abcdef_" + "a" * 43,
        "jk_XYZ_" + "a" * 43,
    ],
)
def test_malformed_keys(store_url: str, token: str) -> None:
    with pytest.raises(AuthenticationError) as caught:
        authenticate(token)
    assert caught.value.reason == "malformed key"


def test_unknown_id_and_wrong_secret_are_both_unknown(store_url: str) -> None:
    info, token = create_api_key("k", scopes=["runs:read"])
    secret = token.split("_", 2)[2]
    wrong_secret = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    for bad in (f"jk_{info.id}_{wrong_secret}", f"jk_{'0' * 16}_{secret}"):
        with pytest.raises(AuthenticationError) as caught:
            authenticate(bad)
        assert caught.value.reason == "unknown key"
        assert "authentication failed: unknown key" in str(caught.value)


def test_expired_key(store_url: str) -> None:
    info, token = create_api_key(
        "short-lived", scopes=["runs:read"], expires_at=datetime.now(UTC) + timedelta(hours=1)
    )
    assert authenticate(token).name == "short-lived"
    with pytest.raises(AuthenticationError) as caught:
        authenticate(token, now=info.expires_at + timedelta(seconds=1))
    assert caught.value.reason == "key expired"
    assert list_api_keys()[0].expired(info.expires_at + timedelta(seconds=1))


def test_expiry_in_the_past_is_refused(store_url: str) -> None:
    with pytest.raises(ApiKeyError, match="in the past"):
        create_api_key("late", scopes=["runs:read"], expires_at=datetime.now(UTC) - timedelta(seconds=1))


def test_revoked_key(store_url: str) -> None:
    _info, token = create_api_key("k", scopes=["runs:read"])
    revoked = revoke_api_key("k", actor="bob")
    assert revoked.revoked and revoked.revoked_at is not None
    with pytest.raises(AuthenticationError) as caught:
        authenticate(token)
    assert caught.value.reason == "key revoked"
    assert list_api_keys() == []
    assert [key.name for key in list_api_keys(include_revoked=True)] == ["k"]
    with pytest.raises(ApiKeyError, match="already revoked"):
        revoke_api_key("k", actor="bob")
    with pytest.raises(ApiKeyError, match="no API key named 'nope'"):
        revoke_api_key("nope", actor="bob")
    with pytest.raises(ApiKeyError, match="already exists"):
        create_api_key("k", scopes=["runs:read"])


def test_invalid_requests_are_refused(store_url: str) -> None:
    with pytest.raises(ApiKeyError, match="at least one scope"):
        create_api_key("k", scopes=[])
    with pytest.raises(ScopeError, match="too many parts"):
        create_api_key("k", scopes=["a:b:c:d"])
    with pytest.raises(ApiKeyError, match="invalid key name"):
        create_api_key("has space", scopes=["runs:read"])
    with pytest.raises(ApiKeyError, match="invalid group"):
        create_api_key("k", scopes=["runs:read"], groups=[""])
    assert list_api_keys(include_revoked=True) == []


def test_create_and_revoke_are_audited(store_url: str) -> None:
    info, _token = create_api_key("ops", scopes=["admin"], groups=["sre"], created_by="alice")
    revoke_api_key("ops", actor="bob", origin="gateway")

    revoke_entry, create_entry = query(target="api_key:ops")
    assert (create_entry.action, create_entry.actor, create_entry.origin) == (
        "api_key.create",
        "alice",
        "cli",
    )
    assert create_entry.details["key_id"] == info.id and create_entry.details["scopes"] == ["admin"]
    assert (revoke_entry.action, revoke_entry.actor, revoke_entry.origin) == (
        "api_key.revoke",
        "bob",
        "gateway",
    )
    assert verify_chain().ok


def test_last_used_is_written_at_most_once_a_minute(store_url: str) -> None:
    info, token = create_api_key("k", scopes=["runs:read"])
    start = datetime.now(UTC)
    authenticate(token, now=start)
    assert get_api_key("k").last_used_at == start
    authenticate(token, now=start + timedelta(seconds=30))
    assert get_api_key("k").last_used_at == start
    later = start + LAST_USED_RESOLUTION + timedelta(seconds=1)
    authenticate(token, now=later)
    assert get_api_key("k").last_used_at == later
    with session_scope() as session:
        assert session.scalar(select(ApiKey.last_used_at).where(ApiKey.id == info.id)) is not None


def test_ensure_local_admin_key_is_idempotent(store_url: str, tmp_path: Path) -> None:
    path = tmp_path / "home" / "admin.key"
    info, created = ensure_local_admin_key(path)
    assert created and info.name == "local-admin" and info.scopes == ("admin",)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text().strip()
    assert authenticate(token).allows("runs:launch")

    again, created_again = ensure_local_admin_key(path)
    assert (again.id, created_again) == (info.id, False)
    assert path.read_text().strip() == token

    # The file is lost: the old key (whose secret nobody holds any more) is revoked, a new one made.
    path.unlink()
    replacement, created_replacement = ensure_local_admin_key(path)
    assert created_replacement and replacement.name == "local-admin-2"
    with pytest.raises(AuthenticationError, match="key revoked"):
        authenticate(token)
    assert authenticate(path.read_text().strip()).name == "local-admin"
    assert [key.name for key in list_api_keys()] == ["local-admin-2"]

    # A file whose key no longer authenticates (e.g. the store was reset) is replaced too.
    path.write_text("jk_0123456789abcdef_" + "a" * 43)
    third, created_third = ensure_local_admin_key(path)
    assert created_third and third.name == "local-admin-3"


def test_ensure_local_admin_key_leaves_user_keys_alone(store_url: str, tmp_path: Path) -> None:
    create_api_key("local-admin", scopes=["runs:read"], created_by="alice")
    info, created = ensure_local_admin_key(tmp_path / "admin.key")
    assert created and info.name == "local-admin-2"
    assert not get_api_key("local-admin").revoked


# ---------------------------------------------------------------------------------------------------
# CLI


def test_cli_create_list_revoke(store_url: str) -> None:
    runner = CliRunner()
    created = runner.invoke(
        cli,
        [
            "keys",
            "create",
            "ci",
            "--scope",
            "runs:launch",
            "--scope",
            "events:publish:orders",
            "--group",
            "ops",
            "--principal",
            "ci-bot",
            "--expires",
            "30d",
        ],
    )
    assert created.exit_code == 0, created.output
    token = created.stdout.strip()
    assert token.startswith("jk_") and len(created.stdout.splitlines()) == 1
    assert "not shown again" in created.stderr
    principal = authenticate(token)
    assert principal.name == "ci-bot" and principal.groups == frozenset({"ops"})
    expires_at = get_api_key("ci").expires_at
    assert timedelta(days=29, hours=23) < expires_at - datetime.now(UTC) <= timedelta(days=30)

    listed = runner.invoke(cli, ["keys", "list"])
    assert listed.exit_code == 0
    header, row = listed.output.splitlines()
    assert header.split() == [
        "NAME",
        "PRINCIPAL",
        "SCOPES",
        "GROUPS",
        "CREATED",
        "EXPIRES",
        "REVOKED",
        "LAST",
        "USED",
    ]
    assert row.startswith("ci ") and "runs:launch,events:publish:orders" in row and token not in listed.output

    revoked = runner.invoke(cli, ["keys", "revoke", "ci"])
    assert revoked.exit_code == 0 and "revoked API key ci" in revoked.output
    assert "no API keys" in runner.invoke(cli, ["keys", "list"]).output
    as_json = json.loads(runner.invoke(cli, ["keys", "list", "--all", "--json"]).output)
    assert [(key["name"], key["revoked_at"] is not None) for key in as_json] == [("ci", True)]
    actions = [entry.action for entry in query(target="api_key:ci")]
    assert actions == ["api_key.revoke", "api_key.create"]


def test_cli_create_with_an_iso_expiry_and_errors(store_url: str) -> None:
    runner = CliRunner()
    ok = runner.invoke(cli, ["keys", "create", "k", "--scope", "runs:read", "--expires", "2099-01-01T00:00Z"])
    assert ok.exit_code == 0, ok.output
    assert get_api_key("k").expires_at == datetime(2099, 1, 1, tzinfo=UTC)

    bad_expiry = runner.invoke(cli, ["keys", "create", "k2", "--scope", "runs:read", "--expires", "soon"])
    assert bad_expiry.exit_code == 2 and "neither a duration" in bad_expiry.output

    bad_scope = runner.invoke(cli, ["keys", "create", "k3", "--scope", "runs"])
    assert isinstance(bad_scope.exception, ScopeError)

    missing_scope = runner.invoke(cli, ["keys", "create", "k4"])
    assert missing_scope.exit_code == 2 and "--scope" in missing_scope.output
    assert [key.name for key in list_api_keys()] == ["k"]
