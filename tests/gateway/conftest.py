"""An in-process gateway on a real platform store (both backends), with Dagster out of reach.

Endpoints that need Dagster are tested end to end against `junction dev` (test_api_live.py); here
everything that is the gateway's own: security, problems, keys, audit, analytics.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from orchestration.kernel.principals import create_api_key


@pytest.fixture
def make_key(store_url: str) -> Callable[..., str]:
    def make(name: str, *scopes: str, **options) -> str:
        _, key = create_api_key(name, scopes=scopes, created_by="test", **options)
        return key

    return make
