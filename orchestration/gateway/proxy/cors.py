"""A route's CORS plugin (the Fetch standard's CORS protocol, as Kong's `cors` plugin): the gateway
answers a route's preflights itself, before auth (browsers send no credentials with them), and adds
the allow headers to every answer of the route for an allowed origin (problems included, so a page can
read why it was refused). The platform API's own CORS (setting `gateway_cors_origins`) does not apply
under `/gateway/proxy`.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestration.gateway.proxy.config import METHODS, CorsSpec
from orchestration.kernel.times import duration_seconds


@dataclass(frozen=True)
class CorsPolicy:
    origins: frozenset[str]
    any_origin: bool
    credentials: bool
    preflight: tuple[tuple[bytes, bytes], ...]  # the allow headers of a preflight, but the origin's
    exposed: tuple[tuple[bytes, bytes], ...]

    @classmethod
    def compile(cls, spec: CorsSpec, route_methods: list[str] | None) -> CorsPolicy:
        methods = spec.methods or route_methods or list(METHODS)
        preflight = [
            (b"access-control-allow-methods", ", ".join(methods).encode()),
            (b"access-control-allow-headers", ", ".join(spec.headers).encode()),
            (b"access-control-max-age", str(int(duration_seconds(spec.max_age))).encode()),
        ]
        exposed = [(b"access-control-expose-headers", ", ".join(spec.expose_headers).encode())]
        return cls(
            frozenset(origin.rstrip("/") for origin in spec.origins if origin != "*"),
            "*" in spec.origins,
            spec.credentials,
            tuple(preflight),
            tuple(exposed) if spec.expose_headers else (),
        )

    def allows(self, origin: str) -> bool:
        return self.any_origin or origin in self.origins

    def _origin_headers(self, origin: str) -> list[tuple[bytes, bytes]]:
        shown = b"*" if self.any_origin and not self.credentials else origin.encode("latin-1")
        headers = [(b"access-control-allow-origin", shown), (b"vary", b"Origin")]
        if self.credentials:
            headers.append((b"access-control-allow-credentials", b"true"))
        return headers

    def preflight_headers(self, origin: str) -> list[tuple[bytes, bytes]]:
        return [*self._origin_headers(origin), *self.preflight]

    def answer_headers(self, origin: str) -> list[tuple[bytes, bytes]]:
        return [*self._origin_headers(origin), *self.exposed]
