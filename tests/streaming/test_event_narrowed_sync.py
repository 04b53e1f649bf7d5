"""Event-driven sync: a pipeline's stream trigger launches its incremental sync for a batch of change
events, and the REST source's params, templated with the batch's keys (`trigger.keys`), read only
the changed records; the narrowed read commits no cursor, so the next full window still finds a
change no event announced. On each event stream backend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa
import yaml
from rest_api import Upstream, start_upstream

from assets.etl.factory import build_pipeline
from assets.etl.spec import load_pipelines
from resources.event_stream import EventStream
from sensors.event_triggers import pipeline_triggers

NAME = "crm_contacts"
STREAM = "crm_changes"


@pytest.fixture(scope="module")
def served() -> Iterator[Upstream]:
    upstream, server = start_upstream()
    yield upstream
    server.shutdown()


@pytest.fixture
def upstream(served: Upstream) -> Upstream:
    served.set_records(12)
    for record in served.records:
        record["updated_at"] = f"2024-01-{record['id']:02d}T00:00:00Z"
    served.page_size = 5
    with served.lock:
        served.requests.clear()
    return served


def rows(url: str) -> dict[int, str]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            return dict(connection.execute(sa.text(f"SELECT id, name FROM {NAME}")).all())
    finally:
        engine.dispose()


def test_change_events_narrow_the_sync_to_their_keys_and_keep_the_cursor(
    upstream: Upstream, declare, event_stream: EventStream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    declare(STREAM)
    url = f"sqlite:///{tmp_path / 'warehouse.db'}"
    spec = {
        "source": {
            "kind": "rest",
            "base_url": upstream.url,
            "path": "/page/records",
            "params": {
                "since": "{{ incremental.start }}",
                "ids": "{{ trigger.keys | join(',') if trigger else '' }}",
            },
            "paginator": {"type": "page_number", "total_pages_path": "total_pages"},
            "data_selector": "data",
        },
        "incremental": {"cursor": "updated_at", "initial": "2024-01-01T00:00:00Z"},
        "transforms": [{"select": ["id", "name", "updated_at"]}],
        "target": {"kind": "sql", "url": url, "table": NAME},
        "load": {"mode": "merge", "keys": ["id"]},
        "triggers": [
            {"stream": STREAM, "key": "customer.id", "max_events_per_run": 2,
             "condition": {"field": "kind", "op": "eq", "value": "updated"}},
        ],
    }  # fmt: skip
    (tmp_path / f"{NAME}.yaml").write_text(yaml.safe_dump(spec))
    pipeline = load_pipelines([tmp_path / f"{NAME}.yaml"])[NAME]
    job = build_pipeline(pipeline).resolve_job_def(f"{NAME}_pipeline")
    instance = dg.DagsterInstance.ephemeral()

    assert job.execute_in_process(instance=instance).success  # the scheduled kind of run: all 12
    assert len(rows(url)) == 12

    for record in upstream.records:
        if record["id"] in (3, 7, 9):  # 9 changes too, but no event says so
            record["name"], record["updated_at"] = f"renamed {record['id']}", "2024-02-01T00:00:00Z"
    event_stream.publish_batch(
        STREAM,
        [
            {"kind": "updated", "customer": {"id": 3}},
            {"kind": "viewed", "customer": {"id": 9}},  # filtered out by the trigger's condition
            {"kind": "updated", "customer": {"id": 7}},
        ],
    )
    [trigger] = pipeline_triggers(pipelines={NAME: pipeline})
    sensor = trigger.sensor(open_events=lambda: event_stream)
    result = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, sensor_name=sensor.name))
    [request] = result.run_requests

    monkeypatch.setattr("resources.event_stream.open_event_stream", lambda *a, **k: event_stream)
    with upstream.lock:
        upstream.requests.clear()
    narrowed = job.execute_in_process(instance=instance, tags=request.tags)
    assert narrowed.success
    assert [query.get("ids") for query in upstream.requests_to("page")] == [["3,7"]]
    staged = narrowed.asset_materializations_for_node(f"{NAME}_staged")[0].metadata["incremental"].value
    assert staged["after"] == staged["before"] == "2024-01-12T00:00:00Z"
    assert staged["narrowed_to"]["keys"] == [3, 7]
    published = narrowed.asset_materializations_for_node(NAME)[0].metadata
    assert published["rows_updated"].value == 2
    found = rows(url)
    assert (found[3], found[7], found[9]) == ("renamed 3", "renamed 7", "customer 9")

    # The next full window still reads from the old cursor: the change no event announced arrives.
    again = job.execute_in_process(instance=instance)
    assert again.asset_materializations_for_node(NAME)[0].metadata["rows_updated"].value == 1
    assert rows(url)[9] == "renamed 9"
