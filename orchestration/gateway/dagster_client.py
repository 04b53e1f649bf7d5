"""An async client for Dagster's webserver (GraphQL and /server_info).

The gateway never calls Dagster's synchronous `DagsterGraphQLClient`: inside an async handler it
would block the event loop. In the combined server the client talks to the in-process Dagster app
through an ASGI transport (no socket, no second process); the standalone gateway talks HTTP to
JUNCTION_DAGSTER_URL. Either way, runs launched through it are queued and tagged exactly like runs
launched from the UI.
"""

from __future__ import annotations

from typing import Any

import httpx


class DagsterUnavailable(Exception):
    """Dagster's webserver could not be reached or answered with a server error."""


class DagsterClient:
    def __init__(
        self, base_url: str, transport: httpx.AsyncBaseTransport | None = None, timeout_s: float = 10.0
    ):
        self.base_url = base_url.rstrip("/")
        self._client = httpx.AsyncClient(base_url=self.base_url, transport=transport, timeout=timeout_s)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise DagsterUnavailable(f"Dagster at {self.base_url} is unreachable: {exc}") from exc
        if response.status_code >= 500:
            raise DagsterUnavailable(f"Dagster at {self.base_url} answered {response.status_code}")
        return response

    async def server_info(self) -> dict[str, Any]:
        response = await self._request("GET", "/server_info")
        response.raise_for_status()
        return response.json()

    async def graphql(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run a GraphQL operation; GraphQL-level errors raise, with Dagster's messages."""
        response = await self._request(
            "POST", "/graphql", json={"query": query, "variables": variables or {}}
        )
        payload = response.json()
        if payload.get("errors"):
            messages = "; ".join(error.get("message", "?") for error in payload["errors"])
            raise DagsterUnavailable(f"Dagster GraphQL error: {messages}")
        return payload["data"]
