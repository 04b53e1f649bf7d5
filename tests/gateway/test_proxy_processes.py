"""Standalone `junction gateway` processes sharing one PostgreSQL store and one Redis: a Redis-shared
rate limit counts once across a gateway and another one running `--workers 2`, keys made in the store
work in each, a route declared through one's admin API is proxied by the other within seconds, and a
proxied answer carries one Date and one Server header (the gateway server's)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from proxy_upstreams import Upstream, start_upstreams
from support import bearer, free_port, start_gateway, wait_healthy

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BURST = 6


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    started = start_upstreams("a")["a"]
    yield started
    started.stop()


def test_gateway_processes_share_limits_keys_and_admin_objects(
    tmp_path: Path, clean_postgres_url: str, clean_redis_url: str, upstream: Upstream
):
    from orchestration.kernel.principals import create_api_key
    from orchestration.store.db import get_engine

    routes = tmp_path / "routes.yaml"
    limit = {
        "algorithm": "token_bucket",
        "rate": 1,
        "per": "1h",
        "burst": BURST,
        "by": ["route"],
        "shared": True,
    }
    routes.write_text(
        yaml.safe_dump(
            {
                "upstreams": {"a": {"targets": [{"url": upstream.url}]}},
                "routes": {"limited": {"path": "/limited", "upstream": "a", "rate_limits": [limit]}},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUNCTION_") and k != "DAGSTER_HOME"}
    env.update(
        {
            "JUNCTION_HOME": str(tmp_path / "home"),
            "JUNCTION_DATABASE_URL": clean_postgres_url,
            "JUNCTION_REDIS_URL": clean_redis_url,
            "JUNCTION_ROUTES_FILE": str(routes),
            "JUNCTION_DAGSTER_URL": f"http://127.0.0.1:{free_port()}",
        }
    )
    one, one_url = start_gateway(tmp_path, env, "one")
    two, two_url = start_gateway(tmp_path, env, "two", "--workers", "2")
    try:
        wait_healthy(one_url, one, tmp_path / "one.log")
        wait_healthy(two_url, two, tmp_path / "two.log")
        # The store is migrated by the gateways: keys made now are seen by both.
        engine = get_engine(clean_postgres_url)
        caller = bearer(create_api_key("caller", scopes=["proxy:call"], engine=engine)[1])
        manager = bearer(create_api_key("manager", scopes=["gateway:manage"], engine=engine)[1])
        statuses = []
        with httpx.Client(timeout=10) as client:
            for index in range(3 * BURST):
                base = (one_url, two_url)[index % 2]
                # A new connection each time: `--workers 2` spreads connections over its processes.
                statuses.append(
                    client.get(f"{base}/proxy/limited", headers={**caller, "Connection": "close"}).status_code
                )
            assert statuses.count(200) == BURST, statuses
            assert statuses.count(429) == 2 * BURST
            assert len(upstream.seen) == BURST

            route = {"path": "/declared", "upstream": "a", "auth": {"type": "open"}}
            assert client.put(f"{one_url}/v1/routes/declared", json=route, headers=manager).status_code == 201
            deadline = time.monotonic() + 15
            while client.get(f"{two_url}/proxy/declared", headers={"Connection": "close"}).status_code != 200:
                assert time.monotonic() < deadline, "the other gateway never picked up the route"
                time.sleep(0.2)
            answer = client.get(f"{one_url}/proxy/declared")
            assert answer.status_code == 200 and answer.headers["x-served-by"] == "a"
            # The upstream's Date and Server are not relayed beside the gateway server's own.
            assert len(answer.headers.get_list("date")) == 1 and len(answer.headers.get_list("server")) == 1
    finally:
        for process in (one, two):
            process.terminate()
        for process in (one, two):
            assert process.wait(timeout=30) == 0
