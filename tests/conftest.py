"""Shared fixtures: an isolated JUNCTION_HOME per test and the real services, one per xdist worker.

PostgreSQL and Redis are the real servers on this machine. Each xdist worker gets its own PostgreSQL
database and Redis database number, so `pytest -n auto` is safe. When a service is unreachable the
test is skipped with the reason, unless services are required (`CI=true` or
`JUNCTION_REQUIRE_SERVICES=1`), in which case it fails: CI never passes by skipping.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from support import free_port, service_unavailable

POSTGRES_ADMIN_URL = os.environ.get(
    "JUNCTION_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
)
REDIS_BASE_URL = os.environ.get("JUNCTION_TEST_REDIS_URL", "redis://127.0.0.1:6379")

# Environment that would leak the developer's own configuration into a test.
_ISOLATED_VARIABLES = [name for name in os.environ if name.startswith("JUNCTION_") and "TEST" not in name]
_ISOLATED_VARIABLES.append("DAGSTER_HOME")


def worker_index(worker_id: str) -> int:
    return 0 if worker_id == "master" else int(worker_id.removeprefix("gw"))


@pytest.fixture(scope="session")
def postgres_url(worker_id: str, testrun_uid: str) -> Iterator[str]:
    """A PostgreSQL database of this worker's own, created fresh for the session.

    The name carries the test run's id too, so two test runs on one machine (two checkouts, or a
    developer's run beside CI) never drop each other's databases.
    """
    name = f"junction_test_{testrun_uid[:10]}_{worker_id}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001 - any connection failure means the service is missing
        admin.dispose()
        service_unavailable(f"PostgreSQL at {POSTGRES_ADMIN_URL}: {str(exc).splitlines()[0]}")
    url = make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    yield url
    from orchestration.store.db import dispose_engines

    dispose_engines()
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def reset_postgres(url: str) -> None:
    """Empty the worker's database between tests (every table, Alembic's version table included)."""
    from orchestration.store.db import dispose_engines

    dispose_engines()
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text("DROP SCHEMA public CASCADE"))
        connection.execute(text("CREATE SCHEMA public"))
    engine.dispose()


@pytest.fixture
def clean_postgres_url(postgres_url: str) -> str:
    reset_postgres(postgres_url)
    return postgres_url


@pytest.fixture(scope="session")
def redis_url(worker_id: str) -> str:
    """A Redis database number of this worker's own (1..15; 0 is left to developers)."""
    import redis

    url = f"{REDIS_BASE_URL}/{1 + worker_index(worker_id) % 15}"
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2)
        client.ping()
    except Exception as exc:  # noqa: BLE001
        service_unavailable(f"Redis at {REDIS_BASE_URL}: {exc}")
    client.close()
    return url


@pytest.fixture
def clean_redis_url(redis_url: str) -> str:
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    client.close()
    return redis_url


@pytest.fixture
def junction_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An isolated JUNCTION_HOME (embedded default: SQLite, no Redis) with fresh settings."""
    from orchestration.settings import reset_settings_cache
    from orchestration.store.db import dispose_engines

    for name in _ISOLATED_VARIABLES:
        # Set first so monkeypatch restores the original state even if code under test (such as
        # `prepare_dagster_home`, which exports DAGSTER_HOME) sets the variable afterwards.
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    home = tmp_path / "junction-home"
    monkeypatch.setenv("JUNCTION_HOME", str(home))
    reset_settings_cache()
    yield home
    dispose_engines()
    reset_settings_cache()


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, junction_home: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A migrated, empty platform store on each backend, set as JUNCTION_DATABASE_URL."""
    from orchestration.settings import reset_settings_cache
    from orchestration.store import upgrade

    if request.param == "sqlite":
        url = f"sqlite:///{junction_home / 'platform.db'}"
    else:
        url = request.getfixturevalue("clean_postgres_url")
    monkeypatch.setenv("JUNCTION_DATABASE_URL", url)
    reset_settings_cache()
    upgrade(url)
    return url


class PlatformProcess:
    """`junction dev` as a real subprocess on a free port, stopped with SIGTERM like a user's Ctrl-C."""

    def __init__(self, env: dict[str, str], port: int, log_path: Path, args: tuple[str, ...] = ()):
        import subprocess
        import sys

        self.port = port
        self.env = env  # what a command run against this platform needs (`junction events ...`)
        self.home = Path(env["JUNCTION_HOME"])
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "orchestration.cli", "dev", "--port", str(port), *args],
            env=env,
            cwd=Path(__file__).resolve().parent.parent,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.descendants: list = []

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 120) -> dict:
        """Wait for the Dagster webserver and a healthy gateway; returns the health document."""
        import time

        import httpx
        import psutil

        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"junction dev exited with {self.process.returncode}:\n{self.log()[-4000:]}"
                )
            try:
                info = httpx.get(f"{self.base_url}/server_info", timeout=2)
                health = httpx.get(f"{self.base_url}/gateway/health", timeout=5)
                last = f"{info.status_code} {health.status_code} {health.text[:500]}"
                if info.status_code == 200 and health.status_code == 200:
                    # Code locations load asynchronously; wait until they have.
                    if "loaded:" in health.json()["services"]["code_locations"]["detail"]:
                        self.descendants = psutil.Process(self.process.pid).children(recursive=True)
                        return health.json()
            except httpx.HTTPError as exc:
                last = str(exc)
            time.sleep(0.5)
        raise AssertionError(f"platform not ready in {timeout_s}s: {last}\n{self.log()[-4000:]}")

    def stop(self, timeout_s: float = 60) -> int:
        import signal
        import subprocess

        import psutil

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(
                f"junction dev did not stop in {timeout_s}s:\n{self.log()[-4000:]}"
            ) from None
        finally:
            self._log.close()
        _, alive = psutil.wait_procs(self.descendants, timeout=30)
        for orphan in alive:
            orphan.kill()
        assert not alive, f"processes left behind: {[p.pid for p in alive]}"
        return code


def platform_starter(base: Path):
    """Start `junction dev` processes under `base`; returns (start, stop_all)."""
    started: list[PlatformProcess] = []

    def start(extra_env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> PlatformProcess:
        env = {k: v for k, v in os.environ.items() if k not in _ISOLATED_VARIABLES}
        env["JUNCTION_HOME"] = str(base / f"home-{len(started)}")
        env.update(extra_env or {})
        platform = PlatformProcess(env, free_port(), base / f"platform-{len(started)}.log", args)
        started.append(platform)
        return platform

    def stop_all() -> None:
        for platform in started:
            if platform.process.poll() is None:
                platform.stop()

    return start, stop_all


@pytest.fixture
def start_platform(tmp_path: Path):
    """Start `junction dev` with extra environment; every platform started is stopped afterwards."""
    start, stop_all = platform_starter(tmp_path)
    yield start
    stop_all()


@pytest.fixture(scope="session")
def live_platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PlatformProcess]:
    """One running embedded platform shared by the tests of this worker that only read or launch."""
    start, stop_all = platform_starter(tmp_path_factory.mktemp("live-platform"))
    platform = start()
    platform.wait_ready()
    yield platform
    stop_all()


@pytest.fixture(scope="session")
def admin_key(live_platform: PlatformProcess) -> str:
    """The local admin key `junction dev` generated on its first start."""
    return (live_platform.home / "admin.key").read_text().strip()


@pytest.fixture
def gateway(store_url: str) -> Iterator[Callable[..., Any]]:
    """Build an in-process gateway client on the test store with settings overrides; Dagster is a
    closed port (endpoints that need it are tested against `junction dev`)."""
    from fastapi.testclient import TestClient

    from orchestration.gateway.app import create_gateway_app
    from orchestration.settings import JunctionSettings

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
