"""Plain helpers shared by test modules (fixtures live in the conftest files)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nobody listens on right now (bound and released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
