"""Run performance: real runs on a Dagster instance recorded by the `run_performance` sensor, read
back through the store, `/gateway/v1/metrics/runs` and the metrics families."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest
from support import bearer

from orchestration.gateway.api.analytics import performance_metric_families
from sensors.performance import job_summaries, prune, record_finished_runs, run_performance, run_series


@dg.asset(name="perf_staged")
def perf_staged() -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata={"rows_read": 1200, "rows_loaded": 1000})


@dg.asset(name="perf", deps=[perf_staged])
def perf() -> None:
    return None


@dg.op
def boom() -> None:
    raise RuntimeError("no")


@dg.job
def failing_job() -> None:
    boom()


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        yield test_instance


def run_some(instance: dg.DagsterInstance) -> None:
    for _ in range(2):
        dg.materialize([perf_staged, perf], instance=instance)
    failing_job.execute_in_process(instance=instance, raise_on_error=False)


def test_finished_runs_are_recorded_once_with_steps_and_rows(store_url: str, instance) -> None:
    run_some(instance)
    count, cursor = record_finished_runs(instance, None)
    assert count == 3 and cursor is not None
    assert record_finished_runs(instance, cursor) == (0, cursor)
    series = run_series()
    assert [run["status"] for run in series] == ["FAILURE", "SUCCESS", "SUCCESS"]
    failed, success = series[0], series[1]
    assert failed["job"] == "failing_job" and failed["rows"] is None
    assert failed["steps"]["boom"]["status"] == "FAILURE"
    assert success["rows"] == 1200 and success["rows_per_s"] > 0
    assert set(success["steps"]) == {"perf_staged", "perf"}
    assert all(step["seconds"] >= 0 for step in success["steps"].values())
    assert success["duration_s"] > 0 and success["queued_s"] >= 0
    summary = job_summaries(series)
    assert summary["failing_job"]["failures"] == 1
    assert summary["__ephemeral_asset_job__"]["runs"] == 2
    families = {family.name: family for family in performance_metric_families(summary)}
    labels = [sample.labels for sample in families["junction_run_duration_seconds"].samples]
    assert {"job": "__ephemeral_asset_job__", "quantile": "0.95"} in labels


def test_the_sensor_keeps_a_cursor_and_old_figures_are_pruned(store_url: str, instance) -> None:
    run_some(instance)
    context = dg.build_sensor_context(instance=instance)
    first = run_performance(context)
    assert first.skip_message == "3 finished run(s) recorded; 0 older than the retention removed"
    assert context.cursor is not None
    again = run_performance(dg.build_sensor_context(instance=instance, cursor=context.cursor))
    assert again.skip_message.startswith("0 finished run(s) recorded")
    assert prune(None, timedelta(days=1), now=datetime.now(UTC) + timedelta(days=2)) == 3
    assert run_series() == []


def test_the_api_answers_with_series_and_summaries(gateway, store_url: str, instance) -> None:
    from orchestration.kernel.principals import create_api_key

    run_some(instance)
    record_finished_runs(instance, None)
    client = gateway()
    _, key = create_api_key("perf-reader", scopes=["metrics:read"], created_by="test")
    page = client.get("/v1/metrics/runs", params={"job": "failing_job"}, headers=bearer(key)).json()
    assert [run["job"] for run in page["runs"]] == ["failing_job"]
    assert page["jobs"]["failing_job"]["failures"] == 1
    assert client.get("/v1/metrics/runs", params={"limit": 0}, headers=bearer(key)).status_code == 422
    assert client.get("/v1/metrics/runs").status_code == 401
