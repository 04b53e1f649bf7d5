"""Keys, scopes, JWTs and the request guards, answered as problem documents."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from support import bearer

from orchestration.kernel.audit import query
from orchestration.kernel.principals import revoke_api_key

PROBLEM = "application/problem+json"


def assert_problem(response, status: int, slug: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["status"] == status and body["title"]
    if slug:
        assert body["type"] == f"urn:junction:problem:{slug}"
    assert "Traceback" not in response.text
    return body


def test_missing_malformed_unknown_keys_are_401(gateway):
    client = gateway()
    assert_problem(client.get("/v1/audit"), 401, "unauthorized")
    assert client.get("/v1/audit").headers["www-authenticate"] == "Bearer"
    assert (
        "malformed key" in assert_problem(client.get("/v1/audit", headers=bearer("nonsense")), 401)["detail"]
    )
    unknown = "jk_0123456789abcdef_" + "A" * 43
    assert "unknown key" in assert_problem(client.get("/v1/audit", headers=bearer(unknown)), 401)["detail"]


def test_both_header_styles_authenticate(gateway, make_key):
    key = make_key("reader", "audit:read")
    client = gateway()
    assert client.get("/v1/audit", headers=bearer(key)).status_code == 200
    assert client.get("/v1/audit", headers={"X-API-Key": key}).status_code == 200


def test_missing_scope_is_403(gateway, make_key):
    key = make_key("runner", "runs:read")
    body = assert_problem(gateway().post("/v1/jobs/any/runs", json={}, headers=bearer(key)), 403, "forbidden")
    assert "runs:launch" in body["detail"]


def test_revoked_and_expired_keys_are_refused(gateway, make_key):
    revoked = make_key("soon-revoked", "audit:read")
    revoke_api_key("soon-revoked", actor="test")
    expiring = make_key("expiring", "audit:read", expires_at=datetime.now(UTC) + timedelta(seconds=1))
    client = gateway()
    assert "key revoked" in assert_problem(client.get("/v1/audit", headers=bearer(revoked)), 401)["detail"]
    time.sleep(1.2)
    assert "key expired" in assert_problem(client.get("/v1/audit", headers=bearer(expiring)), 401)["detail"]


def test_public_read_opens_read_only_endpoints_only(gateway):
    client = gateway(gateway_public_read=True)
    assert client.get("/v1/analytics/requests").status_code == 200
    assert_problem(client.post("/v1/jobs/x/runs", json={}), 401)
    assert_problem(gateway().get("/v1/analytics/requests"), 401)


def test_keys_administration_is_audited(gateway, make_key):
    admin = make_key("boss", "admin")
    manager = make_key("manager", "keys:manage", "keys:read")
    client = gateway()

    created = client.post(
        "/v1/keys", json={"name": "ci", "scopes": ["runs:launch"], "groups": ["ops"]}, headers=bearer(manager)
    )
    assert created.status_code == 201, created.text
    new_key = created.json()["key"]
    assert created.json()["info"]["scopes"] == ["runs:launch"]
    assert new_key.startswith("jk_")

    listed = client.get("/v1/keys", headers=bearer(manager)).json()["keys"]
    assert {"ci", "manager", "boss"} <= {k["name"] for k in listed}
    assert new_key not in str(listed)

    assert_problem(
        client.post("/v1/keys", json={"name": "ci", "scopes": ["runs:read"]}, headers=bearer(manager)), 409
    )
    assert_problem(
        client.post("/v1/keys", json={"name": "x", "scopes": ["admin"]}, headers=bearer(manager)), 403
    )
    assert (
        client.post("/v1/keys", json={"name": "x", "scopes": ["admin"]}, headers=bearer(admin)).status_code
        == 201
    )
    bad_scope = client.post(
        "/v1/keys", json={"name": "y", "scopes": ["Runs:LAUNCH"]}, headers=bearer(manager)
    )
    assert assert_problem(bad_scope, 422)["field"] == "body.scopes.0"

    assert client.delete("/v1/keys/ci", headers=bearer(manager)).json()["revoked_at"]
    assert_problem(client.delete("/v1/keys/ci", headers=bearer(manager)), 409)
    assert_problem(client.delete("/v1/keys/nobody", headers=bearer(manager)), 404)
    assert (
        "cannot revoke itself"
        in assert_problem(client.delete("/v1/keys/manager", headers=bearer(manager)), 409)["detail"]
    )
    assert_problem(client.get("/v1/audit", headers=bearer(new_key)), 401)

    actions = [(e.action, e.actor, e.origin) for e in query(target="api_key:ci")]
    assert actions == [("api_key.revoke", "manager", "gateway"), ("api_key.create", "manager", "gateway")]


def test_audit_query_filters_and_pages(gateway, make_key):
    key = make_key("auditor", "audit:read")
    for index in range(5):
        make_key(f"k{index}", "runs:read")
    client = gateway()
    page = client.get(
        "/v1/audit", params={"action": "api_key.create", "limit": 3}, headers=bearer(key)
    ).json()
    assert len(page["entries"]) == 3 and page["next_before_id"] == page["entries"][-1]["id"]
    rest = client.get(
        "/v1/audit",
        params={"action": "api_key.create", "limit": 3, "before_id": page["next_before_id"]},
        headers=bearer(key),
    ).json()
    assert len(rest["entries"]) == 3 and rest["next_before_id"] == rest["entries"][-1]["id"]
    assert_problem(client.get("/v1/audit", params={"limit": 0}, headers=bearer(key)), 422, "validation")


@pytest.mark.parametrize(
    ("kwargs", "status", "slug"),
    [
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "malformed-json"),
        ({"json": {"run_config": "not an object"}}, 422, "validation"),
        ({"json": {"unexpected": 1}}, 422, "validation"),
        (
            {"content": b"a=b", "headers": {"content-type": "application/x-www-form-urlencoded"}},
            415,
            "unsupported-media-type",
        ),
        (
            {"content": b"[" + b"1," * 600_000 + b"1]", "headers": {"content-type": "application/json"}},
            413,
            "body-too-large",
        ),
    ],
)
def test_bad_requests(gateway, make_key, kwargs, status, slug):
    key = make_key("launcher", "runs:launch")
    kwargs = dict(kwargs)  # parametrized values are shared between the two store backends
    headers = {**bearer(key), **kwargs.pop("headers", {})}
    body = assert_problem(gateway().post("/v1/jobs/some_job/runs", headers=headers, **kwargs), status, slug)
    if status == 422:
        assert body["field"].startswith("body")


def test_chunked_body_over_the_limit_is_413(gateway, make_key):
    key = make_key("launcher", "runs:launch")

    def chunks():
        for _ in range(20):
            yield b" " * 1000

    response = gateway(gateway_max_body_bytes=5000).post(
        "/v1/jobs/x/runs", content=chunks(), headers={**bearer(key), "content-type": "application/json"}
    )
    assert_problem(response, 413, "body-too-large")


def test_dagster_unreachable_is_503(gateway, make_key):
    key = make_key("reader", "runs:read", "runs:launch")
    client = gateway()
    assert_problem(client.get("/v1/jobs", headers=bearer(key)), 503, "dagster-unavailable")
    assert_problem(client.post("/v1/jobs/x/runs", json={}, headers=bearer(key)), 503, "dagster-unavailable")


def test_unknown_route_and_method(gateway):
    client = gateway()
    assert_problem(client.get("/v1/nowhere"), 404, "not-found")
    assert_problem(client.put("/health", json={}), 405)


def test_ip_lists(gateway):
    # The test client's peer is "testclient", not an address: it passes only without an allow list.
    assert gateway(gateway_deny_ips=["10.0.0.0/8"]).get("/health").status_code != 403
    assert_problem(gateway(gateway_allow_ips=["10.0.0.0/8"]).get("/health"), 403, "ip-denied")


def test_ip_lists_on_addresses():
    from orchestration.gateway.guards import ClientNetworks

    networks = ClientNetworks(["127.0.0.0/8", "::1/128"], ["127.0.0.9/32"])
    assert networks.allows("127.0.0.1") and networks.allows("::1")
    assert not networks.allows("127.0.0.9")
    assert not networks.allows("192.168.1.1")
    assert not networks.allows("testclient"), "an unknown peer passes only without an allow list"
    assert ClientNetworks([], ["10.0.0.0/8"]).allows("testclient")


def test_security_headers_and_cors(gateway):
    client = gateway(gateway_cors_origins=["https://app.example"])
    response = client.get("/health", headers={"Origin": "https://app.example"})
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert "default-src 'none'" in response.headers["content-security-policy"]
    assert response.headers["access-control-allow-origin"] == "https://app.example"
    preflight = client.options(
        "/v1/jobs/x/runs",
        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
    )
    assert preflight.status_code == 200
    assert (
        "access-control-allow-origin"
        not in client.get("/health", headers={"Origin": "https://evil.example"}).headers
    )


def test_docs_page_is_served_without_a_cdn(gateway):
    client = gateway()
    page = client.get("/docs")
    assert page.status_code == 200 and "cdn" not in page.text.lower()
    assert "'self'" in page.headers["content-security-policy"]
    script = page.text.split('src="')[1].split('"')[0]
    assert client.get(script).status_code == 200


# --- JWT ---------------------------------------------------------------------------------------


def hs256_token(secret: str, **claims) -> str:
    base = {"iss": "https://idp.example", "aud": "junction", "sub": "alice", "exp": int(time.time()) + 60}
    return jwt.encode({**base, **claims}, secret, algorithm="HS256")


def test_jwt_hs256_accept_and_reject(gateway, monkeypatch):
    monkeypatch.setenv("IDP_SECRET", "s" * 32)
    client = gateway(jwt_issuer="https://idp.example", jwt_audience="junction", jwt_secret_env="IDP_SECRET")

    good = hs256_token("s" * 32, scope="audit:read analytics:read", groups=["finance"])
    assert client.get("/v1/audit", headers=bearer(good)).status_code == 200

    cases = {
        "expired": hs256_token("s" * 32, scope="audit:read", exp=int(time.time()) - 10),
        "wrong audience": hs256_token("s" * 32, scope="audit:read", aud="other"),
        "wrong issuer": hs256_token("s" * 32, scope="audit:read", iss="https://evil.example"),
        "wrong secret": hs256_token("x" * 32, scope="audit:read"),
    }
    for name, token in cases.items():
        assert_problem(client.get("/v1/audit", headers=bearer(token)), 401), name
    no_scope = hs256_token("s" * 32, scope="runs:read")
    assert_problem(client.get("/v1/audit", headers=bearer(no_scope)), 403)
    unsigned = jwt.encode(
        {"iss": "https://idp.example", "aud": "junction", "sub": "a", "exp": time.time() + 60},
        None,
        algorithm="none",
    )
    assert_problem(client.get("/v1/audit", headers=bearer(unsigned)), 401)


def test_jwt_rs256(gateway, tmp_path):
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "idp.pem").write_bytes(public_pem)
    client = gateway(jwt_issuer="https://idp.example", jwt_public_key_file=tmp_path / "idp.pem")
    claims = {
        "iss": "https://idp.example",
        "sub": "bob",
        "exp": int(time.time()) + 60,
        "scope": ["audit:read"],
    }
    token = jwt.encode(claims, private, algorithm="RS256")
    assert client.get("/v1/audit", headers=bearer(token)).status_code == 200
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert_problem(client.get("/v1/audit", headers=bearer(jwt.encode(claims, other, algorithm="RS256"))), 401)


def test_store_unreachable_is_503(junction_home, monkeypatch):
    from fastapi.testclient import TestClient
    from support import free_port

    from orchestration.gateway.app import create_gateway_app
    from orchestration.settings import get_settings, reset_settings_cache

    monkeypatch.setenv("JUNCTION_DATABASE_URL", f"postgresql://junction@127.0.0.1:{free_port()}/gone")
    reset_settings_cache()
    with TestClient(create_gateway_app(get_settings()), raise_server_exceptions=False) as client:
        response = client.get("/v1/audit", headers=bearer("jk_0123456789abcdef_" + "A" * 43))
    body = assert_problem(response, 503, "store-unavailable")
    assert "Connection refused" in body["detail"] or "connect" in body["detail"]
