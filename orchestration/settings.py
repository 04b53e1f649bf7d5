"""The one settings object of the platform (pydantic-settings, `JUNCTION_*` environment variables).

Every process (CLI, combined server, code server, run workers) builds its settings from the
environment through `get_settings()`, so one exported variable configures all of them.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Paths in the repository that specs are read from by default (relative to the working directory).
PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The public URL of a platform on `junction dev`'s default host and port.
DEFAULT_PUBLIC_URL = "http://127.0.0.1:3000"


class JunctionSettings(BaseSettings):
    """Junction's configuration. Secrets are never values here: they are referenced by env-var name."""

    model_config = SettingsConfigDict(env_prefix="JUNCTION_", extra="ignore", validate_default=True)

    home: Path = Field(
        default=Path(".junction"),
        description="Local state: the platform store (SQLite), the generated DAGSTER_HOME, keys, backups.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the platform store; default SQLite at $JUNCTION_HOME/platform.db.",
    )
    redis_url: str | None = Field(
        default=None,
        description="Redis for durable uses (streams, rate limits); never an evicting instance. "
        "Unset: the embedded backends are used.",
    )
    gateway_prefix: str = Field(default="/gateway", description="Path the gateway is mounted at.")
    dagster_url: str = Field(
        default="http://127.0.0.1:3000",
        description="How a standalone gateway reaches Dagster's webserver (GraphQL at /graphql).",
    )
    pipelines_dir: Path = Field(
        default=PROJECT_ROOT / "assets" / "pipelines", description="ETL pipeline specs."
    )
    workflows_dir: Path = Field(
        default=PROJECT_ROOT / "orchestration" / "workflows", description="Workflow specs."
    )
    streams_dir: Path = Field(
        default=PROJECT_ROOT / "sensors" / "streams", description="Stream declarations."
    )
    subscriptions_dir: Path = Field(
        default=PROJECT_ROOT / "sensors" / "subscriptions",
        description="Durable webhook subscriptions to event streams.",
    )
    caches_file: Path = Field(
        default=PROJECT_ROOT / "resources" / "caches.yaml",
        description="Cache namespaces: layers, TTLs, size bounds, compression, serializer.",
    )
    routes_file: Path = Field(
        default=PROJECT_ROOT / "resources" / "routes.yaml",
        description="The reverse proxy's routes and upstreams (/gateway/proxy/...).",
    )
    channels_file: Path = Field(
        default=PROJECT_ROOT / "resources" / "channels.yaml",
        description="Named notification channels (secrets referenced by env-var name).",
    )
    performance_retention_days: int = Field(
        default=90, ge=1, description="Days of run performance figures kept (run_performance table)."
    )
    alerts_file: Path = Field(
        default=PROJECT_ROOT / "resources" / "alerts.yaml",
        description="Alert rules: signals, conditions, grouping, inhibitions and their channels.",
    )

    public_url: str = Field(
        default=DEFAULT_PUBLIC_URL,
        description="Where people reach the platform: the base of links in reports and notifications. "
        "Unset, `junction dev` derives it from its --host and --port.",
    )
    secret_key_env: str = Field(
        default="JUNCTION_SECRET_KEY",
        description="NAME of the env var holding the key that signs links; unset: a key generated "
        "once in $JUNCTION_HOME/secret.key.",
    )

    # Live subscriptions (WebSocket and SSE, orchestration/gateway/live/).
    live_heartbeat_s: float = Field(
        default=25, gt=0, description="A WebSocket connection is sent a ping this often."
    )
    live_idle_timeout_s: float = Field(
        default=60, gt=0, description="A connection that sends nothing (not even a pong) this long is closed."
    )
    live_send_queue_bytes: int = Field(
        default=4_194_304,
        ge=1024,
        description="Frames queued for one connection beyond this: the consumer is too slow and is closed.",
    )
    live_max_connections_per_key: int = Field(
        default=100, ge=1, description="Open WebSocket/SSE connections per principal, per gateway process."
    )
    live_token_ttl_s: float = Field(
        default=60,
        gt=0,
        description="How long a stream token (POST /v1/streams/tokens) can open a connection.",
    )

    # The webhook dispatcher (orchestration/gateway/live/dispatcher.py), in every gateway process.
    dispatcher_enabled: bool = Field(
        default=True, description="Deliver the durable webhook subscriptions from this gateway process."
    )
    dispatcher_refresh_s: float = Field(
        default=5, gt=0, description="How often the dispatcher reloads the subscriptions' declarations."
    )
    dispatcher_claim_idle_s: float = Field(
        default=30,
        gt=0,
        description="A delivery pending this long without progress belongs to a dispatcher that "
        "died: another one takes it over.",
    )
    dispatcher_stop_grace_s: float = Field(
        default=5, ge=0, description="On shutdown, in-flight deliveries get this long to finish."
    )

    # The gateway's request guards and security.
    gateway_max_body_bytes: int = Field(default=1_048_576, ge=1, description="Larger request bodies get 413.")
    gateway_cors_origins: list[str] = Field(
        default=[], description='Origins allowed by CORS (JSON list, ["*"] for any).'
    )
    gateway_allow_ips: list[str] = Field(
        default=[], description="Client networks (CIDR) allowed; empty allows all."
    )
    gateway_deny_ips: list[str] = Field(
        default=[], description="Client networks (CIDR) refused (checked first)."
    )
    gateway_public_read: bool = Field(
        default=False, description="Open read-only endpoints without a key (mutating ones never are)."
    )
    jwt_issuer: str | None = Field(
        default=None, description="Accept JWTs from this issuer (enables JWT auth)."
    )
    jwt_audience: str | None = Field(default=None, description="Required JWT audience.")
    jwt_secret_env: str | None = Field(
        default=None, description="NAME of the env var holding the HS256 secret."
    )
    jwt_public_key_file: Path | None = Field(default=None, description="PEM public key for RS256 tokens.")
    jwt_groups_claim: str = Field(default="groups", description="JWT claim with the principal's groups.")
    jwt_scopes_claim: str = Field(
        default="scope", description="JWT claim with scopes (space-separated or list)."
    )

    @field_validator("gateway_allow_ips", "gateway_deny_ips")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        import ipaddress

        for network in value:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError as exc:
                raise ValueError(f"{network!r} is not an IP network: {exc}") from None
        return value

    @field_validator("gateway_prefix")
    @classmethod
    def _prefix_is_a_path(cls, value: str) -> str:
        value = "/" + value.strip("/")
        if value == "/" or " " in value:
            raise ValueError("must be a path such as /gateway (not the root: the Dagster UI lives there)")
        return value

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("database_url", "redis_url")
    @classmethod
    def _blank_is_unset(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def store_url(self) -> str:
        """The platform store's SQLAlchemy URL."""
        return self.database_url or f"sqlite:///{self.home_dir / 'platform.db'}"

    @property
    def dagster_home(self) -> Path:
        """`DAGSTER_HOME` if set (it wins), else the generated `$JUNCTION_HOME/dagster`."""
        explicit = os.environ.get("DAGSTER_HOME")
        return Path(explicit).expanduser().resolve() if explicit else self.home_dir / "dagster"

    @property
    def dagster_home_is_generated(self) -> bool:
        return not os.environ.get("DAGSTER_HOME")

    @property
    def admin_key_file(self) -> Path:
        return self.home_dir / "admin.key"

    @property
    def secret_key_file(self) -> Path:
        return self.home_dir / "secret.key"


def derived_public_url(host: str, port: int) -> str:
    """Where a server listening on host:port is reached from this machine (a wildcard host is
    reached on the loopback address; a remote reader needs JUNCTION_PUBLIC_URL set)."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def export_public_url(settings: JunctionSettings, host: str, port: int) -> JunctionSettings:
    """The settings with `public_url` derived from host:port unless it was set (environment or
    .env), exported as JUNCTION_PUBLIC_URL so the code server, the daemon and every run worker
    started from this process build the same links."""
    if "public_url" in settings.model_fields_set:
        return settings
    os.environ["JUNCTION_PUBLIC_URL"] = derived_public_url(host, port)
    reset_settings_cache()
    return get_settings()


@lru_cache(maxsize=1)
def get_settings() -> JunctionSettings:
    return JunctionSettings()


def reset_settings_cache() -> None:
    """Forget the cached settings (tests change the environment between cases)."""
    get_settings.cache_clear()
