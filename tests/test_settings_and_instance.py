"""Settings, the generated DAGSTER_HOME and the definitions' load cost."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from orchestration.settings import JunctionSettings, get_settings


def test_defaults_are_the_embedded_platform(junction_home: Path):
    settings = get_settings()
    assert settings.home_dir == junction_home.resolve()
    assert settings.store_url == f"sqlite:///{junction_home.resolve() / 'platform.db'}"
    assert settings.redis_url is None
    assert settings.gateway_prefix == "/gateway"
    assert settings.dagster_home == junction_home.resolve() / "dagster"
    assert settings.dagster_home_is_generated
    assert settings.pipelines_dir.parts[-2:] == ("assets", "pipelines")
    assert settings.workflows_dir.parts[-2:] == ("orchestration", "workflows")
    assert settings.streams_dir.parts[-2:] == ("sensors", "streams")


def test_environment_overrides(junction_home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("JUNCTION_DATABASE_URL", "postgresql://u@db/junction")
    monkeypatch.setenv("JUNCTION_REDIS_URL", "redis://cache:6379/2")
    monkeypatch.setenv("JUNCTION_GATEWAY_PREFIX", "api/")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    settings = JunctionSettings()
    assert settings.store_url == "postgresql://u@db/junction"
    assert settings.redis_url == "redis://cache:6379/2"
    assert settings.gateway_prefix == "/api"
    assert settings.dagster_home == tmp_path.resolve()
    assert not settings.dagster_home_is_generated


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("JUNCTION_GATEWAY_PREFIX", "/", "not the root"),
        ("JUNCTION_REDIS_URL", "http://cache:6379", "must start with redis://"),
    ],
)
def test_invalid_settings_are_rejected(junction_home, monkeypatch, variable, value, message):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError, match=message):
        JunctionSettings()


def test_generated_dagster_home_queues_runs_and_monitors_them(junction_home: Path):
    from dagster import DagsterInstance
    from dagster._core.run_coordinator import QueuedRunCoordinator

    from orchestration.instance import DEFAULT_MAX_CONCURRENT_RUNS, prepare_dagster_home

    home = prepare_dagster_home()
    assert home == junction_home.resolve() / "dagster"
    with DagsterInstance.from_config(str(home)) as instance:
        assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
        assert instance.run_monitoring_enabled
        assert (
            instance.get_concurrency_config().run_queue_config.max_concurrent_runs
            == DEFAULT_MAX_CONCURRENT_RUNS
        )
        assert instance.run_storage.__class__.__name__.startswith("Sqlite")


def test_an_explicit_dagster_home_is_used_as_is(junction_home, monkeypatch, tmp_path: Path):
    from orchestration.instance import prepare_dagster_home
    from orchestration.settings import reset_settings_cache

    own = tmp_path / "own-home"
    own.mkdir()
    (own / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(own))
    reset_settings_cache()
    assert prepare_dagster_home() == own.resolve()
    assert (own / "dagster.yaml").read_text() == "telemetry:\n  enabled: false\n"


# Libraries only some ops, commands or the gateway need: every run worker imports the code location,
# so none of them may load with it (they are imported inside the functions that use them).
NOT_LOADED_WITH_THE_CODE_LOCATION = (
    "great_expectations",  # 2.5 s, ~260 MB: the ETL checks, inside a run
    "pandas",  # GX's batches, inside a run
    "httpx",  # webhook channels and HTTP steps, when they send (~0.1 s with rich)
    "sqlalchemy",  # the platform store's ORM and models, when an op or sensor uses the store
    "alembic",  # store migrations, only when migrating
    "pygal",  # quality report charts, when a report is drawn
    "itsdangerous",  # gateway sessions
    "fastapi",  # the gateway
)


def test_loading_the_definitions_stays_light():
    """The code location loads without the libraries only some ops, commands or the gateway need."""
    code = textwrap.dedent(
        f"""
        import sys
        import orchestration.definitions as d
        assert d.defs.get_job_def("audit_log_verification")
        heavy = sorted(m for m in {NOT_LOADED_WITH_THE_CODE_LOCATION!r} if m in sys.modules)
        print(",".join(heavy))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_dagster_validates_the_workspace():
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", str(root / "workspace.yaml")],
        capture_output=True,
        text=True,
        cwd=root,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "All code locations passed validation" in result.stderr + result.stdout


def test_analyst_modules_are_discovered_without_editing_definitions(tmp_path: Path, monkeypatch):
    from orchestration.definitions import analyst_definitions

    package = tmp_path / "analyst_package"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "revenue.py").write_text(
        textwrap.dedent(
            """
            import dagster as dg

            @dg.asset
            def daily_revenue() -> int:
                return 42

            revenue_job = dg.define_asset_job("revenue_job", selection=[daily_revenue])
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import analyst_package

    definitions = analyst_definitions(analyst_package)
    assert definitions.resolve_assets_def("daily_revenue")
    assert definitions.resolve_job_def("revenue_job")


def test_the_run_queue_holds_a_second_run_of_the_same_pipeline(junction_home: Path):
    """Dagster's own tag limits, with the instance's config: one run per pipeline, others unaffected."""
    from dagster import DagsterInstance, DagsterRun
    from dagster._utils.tags import TagConcurrencyLimitsCounter

    from orchestration.instance import prepare_dagster_home

    with DagsterInstance.from_config(str(prepare_dagster_home())) as instance:
        limits = instance.get_concurrency_config().run_queue_config.tag_concurrency_limits
    running = DagsterRun(job_name="orders_pipeline", tags={"junction/pipeline": "orders"})
    counter = TagConcurrencyLimitsCounter(limits, [running])
    assert counter.is_blocked(DagsterRun(job_name="orders_pipeline", tags={"junction/pipeline": "orders"}))
    assert not counter.is_blocked(
        DagsterRun(job_name="flights_pipeline", tags={"junction/pipeline": "flights"})
    )
