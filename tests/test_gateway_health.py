"""The gateway's health endpoint when a backing service is down (the up case runs end to end)."""

from __future__ import annotations

from fastapi.testclient import TestClient
from support import free_port, service_unavailable

from orchestration.gateway.app import create_gateway_app
from orchestration.settings import JunctionSettings
from orchestration.store import upgrade


def test_standalone_gateway_reports_unreachable_dagster_and_redis(junction_home):
    settings = JunctionSettings(
        dagster_url=f"http://127.0.0.1:{free_port()}", redis_url=f"redis://127.0.0.1:{free_port()}/0"
    )
    upgrade(settings.store_url)
    with TestClient(create_gateway_app(settings)) as client:
        response = client.get("/health")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "degraded"
    assert body["services"]["platform_store"]["status"] == "ok"
    assert body["services"]["dagster"]["status"] == "down"
    assert "unreachable" in body["services"]["dagster"]["detail"]
    assert body["services"]["redis"]["status"] == "down"


def test_store_behind_the_code_is_reported(junction_home):
    settings = JunctionSettings(dagster_url=f"http://127.0.0.1:{free_port()}")
    with TestClient(create_gateway_app(settings)) as client:
        body = client.get("/health").json()
    assert body["services"]["platform_store"]["status"] == "down"
    assert "junction db upgrade" in body["services"]["platform_store"]["detail"]


def test_openapi_document_is_served(junction_home):
    with TestClient(create_gateway_app(JunctionSettings())) as client:
        document = client.get("/openapi.json").json()
    assert "/health" in document["paths"]


def test_an_evicting_redis_is_reported_down(junction_home, tmp_path):
    import shutil
    import subprocess
    import time

    import redis

    if not shutil.which("redis-server"):
        service_unavailable("redis-server is not installed")
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--maxmemory", "10mb", "--maxmemory-policy", "allkeys-lru", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        client = redis.Redis(port=port)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        settings = JunctionSettings(
            dagster_url=f"http://127.0.0.1:{free_port()}", redis_url=f"redis://127.0.0.1:{port}/0"
        )
        upgrade(settings.store_url)
        with TestClient(create_gateway_app(settings)) as gateway:
            redis_health = gateway.get("/health").json()["services"]["redis"]
        assert redis_health["status"] == "down"
        assert "allkeys-lru" in redis_health["detail"] and "noeviction" in redis_health["detail"]
    finally:
        server.terminate()
        server.wait()
