"""An in-process gateway on a real platform store (both backends), with Dagster out of reach.

Endpoints that need Dagster are tested end to end against `junction dev` (test_api_live.py); here
everything that is the gateway's own: security, problems, keys, audit, analytics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient
from support import free_port

from orchestration.gateway.app import create_gateway_app
from orchestration.kernel.principals import create_api_key
from orchestration.settings import JunctionSettings


@pytest.fixture
def make_key(store_url: str) -> Callable[..., str]:
    def make(name: str, *scopes: str, **options) -> str:
        _, key = create_api_key(name, scopes=scopes, created_by="test", **options)
        return key

    return make


@pytest.fixture
def gateway(store_url: str) -> Iterator[Callable[..., TestClient]]:
    """Build a gateway client with settings overrides; Dagster is a closed port."""
    clients: list[TestClient] = []

    def build(**overrides) -> TestClient:
        settings = JunctionSettings(dagster_url=f"http://127.0.0.1:{free_port()}", **overrides)
        client = TestClient(create_gateway_app(settings), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield build
    for client in clients:
        client.__exit__(None, None, None)
