"""Poll triggers: a sensor that asks a REST pipeline's API for the first page of its incremental
window and requests a run only when a record is past the committed cursor, keyed by the newest value
so repeated ticks launch one run; evaluated through Dagster's sensor context against the local
upstream, with real runs committing the cursor in between."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import yaml
from rest_api import Upstream, start_upstream

from assets.etl.factory import build_pipeline
from assets.etl.spec import PipelineSpec, load_pipelines
from orchestration.kernel.spec_errors import SpecError, load_specs
from sensors.poll_triggers import poll_sensors

NAME = "polled_customers"


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    served, server = start_upstream()
    served.set_records(12)
    for record in served.records:
        record["updated_at"] = f"2024-01-{record['id']:02d}T00:00:00Z"
    served.page_size = 5
    yield served
    server.shutdown()


def write_spec(folder: Path, upstream: Upstream) -> None:
    spec = {
        "source": {
            "kind": "rest",
            "base_url": upstream.url,
            "path": "/page/records",
            "params": {"since": "{{ incremental.start }}"},
            "paginator": {"type": "page_number", "total_pages_path": "total_pages"},
            "data_selector": "data",
        },
        "incremental": {"cursor": "updated_at", "initial": "2024-01-01T00:00:00Z"},
        "transforms": [{"select": ["id", "name", "updated_at"]}],
        "target": {"kind": "sql", "url": f"sqlite:///{folder / 'warehouse.db'}", "table": NAME},
        "load": {"mode": "merge", "keys": ["id"]},
        "triggers": [{"type": "poll", "every": "30s"}],
    }
    (folder / f"{NAME}.yaml").write_text(yaml.safe_dump(spec))


def test_a_poll_trigger_runs_only_when_the_api_has_records_past_the_cursor(
    upstream: Upstream, pipelines_dir: Path
):
    write_spec(pipelines_dir, upstream)
    pipeline = load_pipelines([pipelines_dir / f"{NAME}.yaml"])[NAME]
    [sensor] = poll_sensors({NAME: pipeline})
    assert sensor.name == f"{NAME}_poll" and sensor.minimum_interval_seconds == 30
    assert sensor.job_name == f"{NAME}_pipeline"
    instance = dg.DagsterInstance.ephemeral()

    def tick() -> dg.SensorResult | dg.SkipReason:
        with upstream.lock:
            upstream.requests.clear()
        result = sensor(dg.build_sensor_context(instance=instance))
        assert len(upstream.requests_to("page")) == 1  # one cheap request per tick
        return result

    # Nothing published yet: the first page has records, so a run is asked for, keyed by its newest.
    first = tick()
    assert [r.run_key for r in first.run_requests] == [f"poll:{NAME}:2024-01-05T00:00:00Z"]
    assert first.run_requests[0].tags["junction/pipeline"] == NAME
    assert [r.run_key for r in tick().run_requests] == [f"poll:{NAME}:2024-01-05T00:00:00Z"]  # same key

    job = build_pipeline(pipeline).resolve_job_def(f"{NAME}_pipeline")
    assert job.execute_in_process(instance=instance).success  # commits the cursor 2024-01-12

    # Only the boundary record is on the first page: no run.
    skipped = tick()
    assert (
        isinstance(skipped, dg.SkipReason)
        and "nothing past updated_at = 2024-01-12T00:00:00Z" in skipped.skip_message
    )

    # A record changes: a run, keyed by the change.
    upstream.records[2]["updated_at"] = "2024-02-01T09:00:00Z"
    changed = tick()
    assert [r.run_key for r in changed.run_requests] == [f"poll:{NAME}:2024-02-01T09:00:00Z"]


def test_a_poll_trigger_needs_an_incremental_rest_source(tmp_path: Path):
    path = tmp_path / "polled.yaml"
    path.write_text(
        "source: {kind: file, format: csv, path: x.csv}\n"
        "target: {kind: sql, url: 'sqlite:///x.db', table: t}\n"
        "triggers: [{type: poll, every: 1m}]\n"
    )
    with pytest.raises(SpecError, match="needs source.kind rest and incremental"):
        load_specs([path], PipelineSpec)


POLLED = """incremental: {cursor: updated_at, initial: '2024-01-01T00:00:00Z'}
target: {kind: sql, url: 'sqlite:///x.db', table: t}
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "source: {kind: rest, base_url: 'http://x', path: orders}\n"
            "triggers: [{type: poll, every: 1m}, {type: poll, every: 5m}]\n",
            "one poll trigger per pipeline",
        ),
        (
            "source: {kind: rest, base_url: 'http://x', path: 'c/{{ parent.id }}/orders',"
            " parent: {pipeline: customers, carry: {customer_id: id}}}\n"
            "triggers: [{type: poll, every: 1m}]\n",
            "a child resource .source.parent. has no first page to poll",
        ),
    ],
)
def test_poll_triggers_refuse_a_second_one_and_child_resources(tmp_path: Path, text: str, expected: str):
    path = tmp_path / "polled.yaml"
    path.write_text(text + POLLED)
    with pytest.raises(SpecError, match=expected):
        load_specs([path], PipelineSpec)
