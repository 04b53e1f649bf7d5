"""The REST source against a local upstream with real APIs' habits: every paginator, every auth
kind, retries (429 with Retry-After, 503), failures naming the URL with secrets masked, a page that
is not JSON quarantined with the counts adding up, and a page slower than the timeout."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from rest_api import Upstream, start_upstream

from assets.etl.quarantine import Quarantine, RowCounts
from assets.etl.runner import iter_pipeline, run_pipeline
from assets.etl.sources import open_source
from assets.etl.sources.rest import RestSource
from assets.etl.spec import PipelineSpec
from orchestration.errors import ConfigurationError, JunctionError
from orchestration.kernel.spec_errors import SpecError, load_specs


@pytest.fixture(scope="module")
def served() -> Iterator[Upstream]:
    upstream, server = start_upstream()
    yield upstream
    server.shutdown()


@pytest.fixture
def upstream(served: Upstream) -> Upstream:
    """The module's server with 25 records, pages of 10, no auth and no faults."""
    served.set_records(25)
    served.page_size = 10
    served.auth = ("none",)
    served.faults.clear()
    served.not_json.clear()
    served.slow.clear()
    served.tokens.clear()
    served.tokens_issued = 0
    served.revoke_tokens_at = None
    served.retry_after = "1"
    with served.lock:
        served.requests.clear()
    return served


def rest_spec(upstream: Upstream, path: str, **source: object) -> PipelineSpec:
    return PipelineSpec.model_validate(
        {"source": {"kind": "rest", "base_url": upstream.url, "path": path, **source}}
    )


def read(spec: PipelineSpec) -> tuple[list[dict], Quarantine, RowCounts, RestSource]:
    source = open_source(spec.source, base_dir=None, batch_size=spec.batch_size)  # type: ignore[arg-type]
    quarantine, counts = Quarantine(), RowCounts()
    rows = [row for table in iter_pipeline(spec, source, quarantine, counts) for row in table.to_pylist()]
    assert isinstance(source, RestSource)
    return rows, quarantine, counts, source


PAGINATORS = {
    "page": {"type": "page_number", "total_pages_path": "total_pages"},
    "offset": {"type": "offset", "limit": 10, "total_path": "total"},
    "cursor": {"type": "cursor", "cursor_path": "meta.next_cursor", "cursor_param": "cursor"},
    "next": {"type": "next_url", "next_url_path": "next"},
    "link": "link_header",
    "single": "single_page",
}


# Offset paging leaves no trace in the answer to detect: undeclared, it fails (the next test).
@pytest.mark.parametrize(
    ("style", "declared"),
    [(style, True) for style in sorted(PAGINATORS)]
    + [(style, False) for style in sorted(PAGINATORS) if style != "offset"],
)
def test_every_paginator_reads_every_record_once(upstream: Upstream, style: str, declared: bool):
    params = {"limit": 10} if style == "offset" else {}
    paginator = PAGINATORS[style] if declared else "auto"
    rows, quarantine, counts, source = read(
        rest_spec(upstream, f"{style}/records", paginator=paginator, params=params)
    )
    assert sorted(row["id"] for row in rows) == list(range(1, 26))
    assert len(quarantine) == 0 and counts.read == 25
    expected_requests = {"page": 3, "offset": 3, "cursor": 3, "next": 3, "link": 3, "single": 1}[style]
    assert len(upstream.requests_to(style)) == expected_requests == source.requests_made
    if not declared:
        assert any("paginator detected" in note for note in source.notes())


def test_nested_objects_are_flattened_and_lists_kept_as_json(upstream: Upstream):
    rows, *_ = read(rest_spec(upstream, "single/records", paginator="single_page"))
    first = min(rows, key=lambda row: row["id"])
    assert first["address__city"] == "city 1" and first["address__geo__lat"] == 0.1
    assert first["tags"] == '["a","b"]'
    kept, *_ = read(rest_spec(upstream, "single/records", paginator="single_page", nested="json"))
    assert min(kept, key=lambda row: row["id"])["address"] == '{"city":"city 1","geo":{"lat":0.1}}'


def test_a_field_the_first_records_lack_is_kept_from_the_records_that_have_it(upstream: Upstream):
    upstream.records[3]["nickname"] = "Four"  # a sparse API: only some records carry the field
    rows, _, counts, _ = read(rest_spec(upstream, "single/records", paginator="single_page"))
    by_id = {row["id"]: row for row in rows}
    assert by_id[4]["nickname"] == "Four" and by_id[1]["nickname"] is None
    assert counts.read == 25


def test_a_full_first_page_with_no_paginator_found_fails_instead_of_reading_one_page(upstream: Upstream):
    with pytest.raises(JunctionError, match="limit=10.*declare source.paginator"):
        read(rest_spec(upstream, "offset/records", params={"limit": 10}))


@pytest.mark.parametrize(
    ("auth", "server_auth", "env"),
    [
        ({"type": "bearer", "token_env": "API_TOKEN"}, ("bearer", "t0ken"), {"API_TOKEN": "t0ken"}),
        (
            {"type": "api_key", "key_env": "API_KEY", "name": "X-Key"},
            ("api_key_header", "X-Key", "k3y"),
            {"API_KEY": "k3y"},
        ),
        (
            {"type": "api_key", "key_env": "API_KEY", "name": "key", "location": "query"},
            ("api_key_query", "key", "k3y"),
            {"API_KEY": "k3y"},
        ),
        (
            {"type": "basic", "username": "ada", "password_env": "API_PASSWORD"},
            ("basic", "ada", "s3cret"),
            {"API_PASSWORD": "s3cret"},
        ),
    ],
    ids=["bearer", "api_key_header", "api_key_query", "basic"],
)
def test_each_auth_kind_is_accepted_and_a_wrong_secret_fails_masked(
    upstream: Upstream, monkeypatch: pytest.MonkeyPatch, auth: dict, server_auth: tuple, env: dict
):
    upstream.auth = server_auth
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    rows, *_ = read(rest_spec(upstream, "page/records", auth=auth))
    assert len(rows) == 25
    for name in env:
        monkeypatch.setenv(name, "wrong-secret-value")
    with pytest.raises(JunctionError) as failure:
        read(rest_spec(upstream, "page/records", auth=auth))
    message = str(failure.value)
    assert "answered 401" in message and f"{upstream.url}/page/records" in message
    assert "wrong-secret-value" not in message


def test_a_missing_secret_is_a_configuration_error_naming_the_variable(upstream: Upstream):
    with pytest.raises(ConfigurationError, match="NO_SUCH_TOKEN"):
        read(rest_spec(upstream, "page/records", auth={"type": "bearer", "token_env": "NO_SUCH_TOKEN"}))


def test_oauth2_fetches_one_token_and_renews_it_once_on_401(
    upstream: Upstream, monkeypatch: pytest.MonkeyPatch
):
    upstream.auth = ("oauth2", "client-1", "client-secret")
    monkeypatch.setenv("CLIENT_ID", "client-1")
    monkeypatch.setenv("CLIENT_SECRET", "client-secret")
    auth = {
        "type": "oauth2_client_credentials",
        "token_url": f"{upstream.url}/oauth/token",
        "client_id_env": "CLIENT_ID",
        "client_secret_env": "CLIENT_SECRET",
    }
    rows, *_ = read(rest_spec(upstream, "page/records", auth=auth))
    assert len(rows) == 25 and upstream.tokens_issued == 1  # one token for every page

    # The server forgets its tokens when page 2 is asked for: the client renews once and carries on.
    upstream.tokens_issued = 0
    upstream.revoke_tokens_at = ("page", 2)
    # One page at a time, so that page 3 is asked after the renewal (see the next test for overlap).
    spec = rest_spec(upstream, "page/records", auth=auth, paginator=PAGINATORS["page"], max_concurrency=1)
    rows, *_ = read(spec)
    assert len(rows) == 25 and upstream.tokens_issued == 2
    statuses = [query.get("page") for _, path, query, _ in upstream.requests if path == "/page/records"]
    assert statuses[-3:] == [["2"], ["2"], ["3"]]  # page 2 asked twice: refused, then with the new token


def test_requests_refused_at_once_renew_the_oauth2_token_once(
    upstream: Upstream, monkeypatch: pytest.MonkeyPatch
):
    upstream.auth = ("oauth2", "client-1", "client-secret")
    monkeypatch.setenv("CLIENT_ID", "client-1")
    monkeypatch.setenv("CLIENT_SECRET", "client-secret")
    auth = {
        "type": "oauth2_client_credentials",
        "token_url": f"{upstream.url}/oauth/token",
        "client_id_env": "CLIENT_ID",
        "client_secret_env": "CLIENT_SECRET",
    }
    upstream.set_records(80)
    upstream.revoke_tokens_at = ("page", 2)  # the server forgets its token as pages 2..8 are asked at once
    spec = rest_spec(upstream, "page/records", auth=auth, paginator=PAGINATORS["page"], max_concurrency=8)
    rows, *_ = read(spec)
    assert len(rows) == 80
    assert upstream.tokens_issued == 2  # renewed once, however many pages were refused with the old one


def test_pages_counted_by_the_first_page_are_asked_at_once_in_page_order(upstream: Upstream):
    upstream.set_records(60)
    upstream.slow = {("page", page): [0.1] for page in range(2, 7)}
    rows, _, _, source = read(
        rest_spec(upstream, "page/records", paginator=PAGINATORS["page"], max_concurrency=5)
    )
    assert [row["id"] for row in rows] == list(range(1, 61))  # in order, whatever answered first
    assert source.pages_read == 6
    started = sorted(at for at, path, _, _ in upstream.requests if path == "/page/records")
    assert started[-1] - started[1] < 0.09  # pages 2..6 were asked before any of them answered
    # A cursor paginator cannot know its pages ahead: one after another.
    rows, *_ = read(rest_spec(upstream, "cursor/records", paginator=PAGINATORS["cursor"], max_concurrency=5))
    assert len(rows) == 60


def test_429_waits_what_retry_after_asks_and_503s_are_retried(upstream: Upstream):
    upstream.faults[("page", 2)] = [429]
    upstream.faults[("page", 3)] = [503, 503]
    rows, quarantine, counts, source = read(
        rest_spec(upstream, "page/records", paginator=PAGINATORS["page"], retry={"initial_backoff": "10ms"})
    )
    assert len(rows) == 25 and len(quarantine) == 0
    assert source.requests_made == 3 + 1 + 2
    second_page = [at for at, path, query, _ in upstream.requests if query.get("page") == ["2"]]
    assert len(second_page) == 2 and second_page[1] - second_page[0] >= 0.95  # Retry-After: 1


def test_retries_end_in_a_failure_naming_the_url_and_status(upstream: Upstream):
    upstream.faults[("page", 1)] = [503] * 5
    with pytest.raises(
        JunctionError, match=r"GET .*/page/records\?page=1 \(page 1\) answered 503 after 3 attempts"
    ):
        read(
            rest_spec(
                upstream,
                "page/records",
                paginator=PAGINATORS["page"],
                retry={"max_attempts": 3, "initial_backoff": "10ms"},
            )
        )


def test_a_4xx_fails_at_once_naming_the_url(upstream: Upstream):
    with pytest.raises(JunctionError, match=r"/missing/records\?page=1 \(page 1\) answered 404"):
        read(rest_spec(upstream, "missing/records", paginator=PAGINATORS["page"]))
    assert len(upstream.requests_to("missing")) == 1


def test_a_page_that_is_not_json_is_quarantined_and_the_counts_add_up(upstream: Upstream):
    upstream.not_json.add(("page", 2))
    rows, quarantine, counts, _ = read(rest_spec(upstream, "page/records", paginator=PAGINATORS["page"]))
    assert sorted(row["id"] for row in rows) == [*range(1, 11), *range(21, 26)]
    (record,) = list(quarantine)
    assert "page 2 is not JSON" in record.reason and "/page/records?page=2" in record.source
    assert counts.read == counts.loaded + counts.filtered_total + counts.quarantined_total == 16


def test_a_cursor_paginator_cannot_pass_a_page_that_is_not_json(upstream: Upstream):
    upstream.not_json.add(("cursor", 2))
    with pytest.raises(JunctionError, match="cannot page past page 2"):
        read(rest_spec(upstream, "cursor/records", paginator=PAGINATORS["cursor"]))


def test_a_page_slower_than_the_timeout_is_retried(upstream: Upstream):
    upstream.slow[("page", 1)] = [1.0]
    rows, *_ = read(rest_spec(upstream, "page/records", timeout="200ms", retry={"initial_backoff": "10ms"}))
    assert len(rows) == 25
    upstream.slow[("page", 1)] = [1.0, 1.0]
    with pytest.raises(JunctionError, match="ReadTimeout"):
        read(
            rest_spec(
                upstream,
                "page/records",
                timeout="200ms",
                retry={"max_attempts": 2, "initial_backoff": "10ms"},
            )
        )


def test_mixed_value_kinds_are_read_as_text_and_typed_by_cast(upstream: Upstream):
    upstream.records[3]["id"] = "four"
    spec = PipelineSpec.model_validate(
        {
            "source": {
                "kind": "rest",
                "base_url": upstream.url,
                "path": "single/records",
                "paginator": "single_page",
            },
            "transforms": [{"cast": {"id": "int64"}}],
        }
    )
    result = run_pipeline(spec)
    assert result.counts.read == 25 and result.counts.loaded == 24
    assert [record.field for record in result.quarantine] == ["id"]


def test_rest_spec_problems_name_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "source: {kind: rest, base_url: 'http://x', paginator: {type: pages}, auth: {type: bearer}}\n"
        "incremental: {cursor: updated_at, initial: '2024-01-01', lag: 10m}\n"
        "target: {kind: sql, url: 'sqlite:///x.db', table: t}\n"
    )
    with pytest.raises(SpecError) as failure:
        load_specs([path], PipelineSpec)
    message = str(failure.value)
    assert "source.paginator" in message and "type must be" in message
    assert "source.auth.token_env" in message


def test_a_scheduled_run_gives_its_time_window_to_the_templates(upstream: Upstream, tmp_path):
    """`run.start`/`run.end`: from the schedule's tick before to the tick that launched the run."""
    import dagster as dg
    import yaml

    from assets.etl.factory import build_pipeline
    from assets.etl.spec import load_pipelines

    spec = {
        "source": {"kind": "rest", "base_url": upstream.url, "path": "/single/records",
                   "params": {"from": "{{ run.start }}", "to": "{{ run.end }}", "run": "{{ run.id }}"}},
        "target": {"kind": "sql", "url": f"sqlite:///{tmp_path / 'w.db'}", "table": "customers"},
        "schedule": "0 6 * * *",
        "timezone": "Europe/Paris",
    }  # fmt: skip
    (tmp_path / "daily.yaml").write_text(yaml.safe_dump(spec))
    job = build_pipeline(load_pipelines([tmp_path / "daily.yaml"])["daily"]).resolve_job_def("daily_pipeline")
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(
            instance=instance, tags={".dagster/scheduled_execution_time": "2026-12-07T05:00:00+00:00"}
        )
    assert result.success
    (query,) = upstream.requests_to("single")
    # 06:00 in Paris is 05:00 UTC: the run stands for the day up to its tick.
    assert query["from"] == ["2026-12-06T05:00:00Z"] and query["to"] == ["2026-12-07T05:00:00Z"]
    assert query["run"] == [result.run_id]


def test_a_run_by_hand_without_a_schedule_has_an_end_and_no_start(upstream: Upstream):
    from datetime import UTC, datetime

    from assets.etl.state import RunWindow

    spec = rest_spec(upstream, "/single/records", params={"from": "{{ run.start }}", "to": "{{ run.end }}"})
    source = open_source(spec.source, base_dir=None, batch_size=100)  # type: ignore[arg-type]
    assert isinstance(source, RestSource)
    source.run = RunWindow.of("r1", {}, None, None, now=datetime(2026, 12, 7, 8, 30, tzinfo=UTC))
    list(source.read(Quarantine()))
    (query,) = upstream.requests_to("single")
    assert "from" not in query and query["to"] == ["2026-12-07T08:30:00Z"]
