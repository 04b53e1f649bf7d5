"""End to end: `junction dev` from the outside, as a user runs it, on both storage configurations."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import pytest
from dagster_graphql import DagsterGraphQLClient

pytestmark = pytest.mark.slow

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def launch_and_wait(port: int, job_name: str, timeout_s: float = 180) -> str:
    """Launch a job through Dagster's GraphQL API (as the UI does) and wait for its end state."""
    from dagster import DagsterRunStatus

    client = DagsterGraphQLClient("127.0.0.1", port_number=port)
    run_id = client.submit_job_execution(job_name, repository_location_name="junction")
    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        status = client.get_run_status(run_id)
        if status in (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED):
            return status.value
        time.sleep(0.5)
    raise AssertionError(f"run {run_id} still {status} after {timeout_s}s")


def test_embedded_default_serves_ui_and_gateway_and_runs_a_job(start_platform):
    platform = start_platform()
    health = platform.wait_ready()
    assert health["status"] == "ok"
    assert health["services"]["platform_store"]["status"] == "ok"
    assert health["services"]["daemon"]["status"] == "ok"
    assert health["services"]["redis"]["status"] == "embedded"
    assert health["versions"]["dagster"] == "1.13.27"

    # The Dagster UI is served from the same port, below the gateway's prefix.
    assert httpx.get(f"{platform.base_url}/runs").status_code == 200
    assert launch_and_wait(platform.port, "audit_log_verification") == "SUCCESS"

    assert (platform.home / "admin.key").exists(), "the first start creates a local admin key"
    assert (platform.home / "dagster" / "dagster.yaml").exists()
    assert platform.stop() == 0


def test_postgres_and_redis_storage_with_the_shipped_dagster_yaml(
    start_platform, tmp_path, clean_postgres_url, clean_redis_url
):
    dagster_home = tmp_path / "dagster-home"
    dagster_home.mkdir()
    shutil.copy(PROJECT_ROOT / "deploy" / "dagster.yaml", dagster_home / "dagster.yaml")
    platform = start_platform(
        {
            "DAGSTER_HOME": str(dagster_home),
            "DAGSTER_POSTGRES_URL": clean_postgres_url,
            "JUNCTION_DATABASE_URL": clean_postgres_url,
            "JUNCTION_REDIS_URL": clean_redis_url,
        }
    )
    health = platform.wait_ready()
    assert health["services"]["redis"]["status"] == "ok"
    assert "postgresql" in health["services"]["platform_store"]["detail"]
    assert launch_and_wait(platform.port, "audit_log_verification") == "SUCCESS"

    # The same through the gateway's API, with the generated admin key.
    key = (platform.home / "admin.key").read_text().strip()
    with httpx.Client(base_url=f"{platform.base_url}/gateway", headers={"X-API-Key": key}, timeout=30) as api:
        run_id = api.post("/v1/jobs/audit_log_verification/runs", json={}).json()["run_id"]
        deadline = time.monotonic() + 180
        while (status := api.get(f"/v1/runs/{run_id}").json()["status"]) not in ("SUCCESS", "FAILURE"):
            assert time.monotonic() < deadline, f"run {run_id} still {status}"
            time.sleep(0.5)
        assert status == "SUCCESS"
    assert platform.stop() == 0

    # The run is in PostgreSQL, not in a SQLite file.
    from sqlalchemy import create_engine, text

    engine = create_engine(clean_postgres_url)
    with engine.connect() as connection:
        statuses = connection.execute(text("SELECT status FROM runs")).scalars().all()
        launched_by_api = connection.execute(
            text("SELECT count(*) FROM run_tags WHERE key = 'junction/actor' AND value = 'local-admin'")
        ).scalar()
    engine.dispose()
    assert statuses == ["SUCCESS", "SUCCESS"]
    assert launched_by_api == 1
    # Only compute logs live under DAGSTER_HOME: no SQLite run or event storage was created.
    assert not list(dagster_home.rglob("*.db"))
