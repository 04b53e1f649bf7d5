"""The pipeline and quality-report endpoints over a real Dagster webserver and real pipeline runs.

The Dagster webserver app runs in-process over an in-process code location (no gRPC server, no
daemon), reached by the gateway through an ASGI transport as in `junction dev`. Runs are executed
into the same Dagster instance (SQLite under the test's JUNCTION_HOME); the platform store (API keys)
is real too. The report served through GraphQL is compared with the one built from the instance.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import dagster as dg
import httpx
import pytest
import yaml
from fastapi.testclient import TestClient
from support import bearer

from assets.etl.factory import build_pipeline
from assets.etl.report import QUALITY_REPORT, RunReport, facts_from_instance
from assets.etl.spec import load_pipelines
from orchestration.kernel.principals import create_api_key

ORDERS_RUNS = [
    ["id,amount", "1,10", "2,oops", "3,4"],  # one value quarantined, every check passes
    ["id,amount,channel", "1,-5,web", "2,7,shop"],  # a new column; the warn rule fails on -5
]


def write_spec(folder: Path, name: str, target_path: str) -> None:
    spec = {
        "source": {"format": "csv", "path": f"{name}.csv"},
        "transforms": [{"cast": {"id": "int64", "amount": "float64"}}],
        "rules": [{"name": "amount_positive", "condition": {"field": "amount", "op": "gt", "value": 0}, "severity": "warn"}],
        "target": {"kind": "file", "format": "parquet", "path": target_path},
        "group": "sales",
    }  # fmt: skip
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(spec))


def run_pipeline(instance: dg.DagsterInstance, folder: Path, name: str, rows: list[str]) -> str:
    (folder / f"{name}.csv").write_text("\n".join(rows) + "\n")
    job = build_pipeline(load_pipelines([folder / f"{name}.yaml"])[name]).resolve_job_def(f"{name}_pipeline")
    result = job.execute_in_process(instance=instance, raise_on_error=False)
    assert result.success
    return result.run_id


class Platform:
    def __init__(self, client: TestClient, instance: dg.DagsterInstance, runs: dict[str, list[str]]):
        self.client, self.instance, self.runs = client, instance, runs

    def key(self, *scopes: str) -> dict[str, str]:
        _, key = create_api_key(
            f"key-{len(scopes)}-{'-'.join(s.replace(':', '_') for s in scopes)}",
            scopes=scopes,
            created_by="test",
        )
        return bearer(key)

    def link(self, run_id: str) -> str:
        """The report link the Dagster UI shows in the run's staged materialization metadata."""
        events = self.instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)
        staged = next(e for e in events if e.dagster_event.asset_key == dg.AssetKey("orders_staged"))
        return staged.asset_materialization.metadata[QUALITY_REPORT].value


# The store only holds the API keys here: one backend is enough (the gateway's own tests cover both).
pytestmark = pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)


@pytest.fixture
def platform(store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Platform]:
    from dagster._core.remote_origin import InProcessCodeLocationOrigin
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget
    from dagster_webserver.webserver import DagsterWebserver

    from orchestration.gateway.app import create_gateway_app
    from orchestration.instance import prepare_dagster_home
    from orchestration.settings import reset_settings_cache

    folder = tmp_path / "pipelines"
    folder.mkdir()
    monkeypatch.setenv("JUNCTION_PIPELINES_DIR", str(folder))
    reset_settings_cache()
    write_spec(folder, "orders", "warehouse/orders.parquet")
    write_spec(folder, "returns", "warehouse/returns.parquet")
    prepare_dagster_home()
    instance = dg.DagsterInstance.get()
    runs = {
        "orders": [run_pipeline(instance, folder, "orders", rows) for rows in ORDERS_RUNS],
        "returns": [run_pipeline(instance, folder, "returns", ORDERS_RUNS[0])],
    }
    code = tmp_path / "pipeline_code.py"
    code.write_text("from assets.etl.factory import pipeline_definitions\n\ndefs = pipeline_definitions()\n")
    origin = InProcessCodeLocationOrigin(
        LoadableTargetOrigin(python_file=str(code), attribute="defs"), location_name="pipelines"
    )
    with WorkspaceProcessContext(instance, InProcessWorkspaceLoadTarget(origin)) as workspace:
        dagster_app = DagsterWebserver(workspace).create_asgi_app()
        gateway = create_gateway_app(dagster_transport=httpx.ASGITransport(app=dagster_app))
        with TestClient(gateway, raise_server_exceptions=False) as client:
            yield Platform(client, instance, runs)
    instance.dispose()


def test_the_pipeline_list_shows_target_last_run_and_score(platform: Platform):
    response = platform.client.get("/v1/pipelines", headers=platform.key("pipelines:read"))
    assert response.status_code == 200, response.text
    pipelines = {p["name"]: p for p in response.json()["pipelines"]}
    assert set(pipelines) == {"orders", "returns"}
    orders = pipelines["orders"]
    assert orders["group"] == "sales" and orders["target"] == "parquet file warehouse/orders.parquet"
    assert orders["job"] == "orders_pipeline" and orders["load_mode"] == "append"
    newest = platform.runs["orders"][-1]
    assert orders["last_run"]["run_id"] == newest and orders["last_run"]["status"] == "SUCCESS"
    assert orders["last_report"]["run_id"] == newest
    assert orders["last_report"]["score_checks"] == 0.0  # its one check, the warn rule, failed
    assert orders["last_report"]["score_rows"] == pytest.approx(0.5)
    assert orders["last_report"]["url"].endswith(f"/v1/pipelines/orders/reports/{newest}")


def test_history_is_newest_first_paginated_and_html_on_request(platform: Platform):
    headers = platform.key("pipelines:read")
    first, second = platform.runs["orders"]
    whole = platform.client.get("/v1/pipelines/orders/reports", headers=headers)
    assert whole.status_code == 200 and whole.headers["content-type"] == "application/json"
    rows = whole.json()["reports"]
    assert [row["run_id"] for row in rows] == [second, first]
    assert [row["schema_changed"] for row in rows] == [True, None]
    assert rows[1]["rows_read"] == 3 and rows[1]["rows_quarantined"] == 1 and rows[1]["status"] == "SUCCESS"
    assert whole.json()["next_cursor"] is None

    page = platform.client.get("/v1/pipelines/orders/reports", params={"limit": 1}, headers=headers).json()
    assert [row["run_id"] for row in page["reports"]] == [second] and page["next_cursor"]
    older = platform.client.get(
        "/v1/pipelines/orders/reports", params={"limit": 1, "before": page["next_cursor"]}, headers=headers
    ).json()
    assert [row["run_id"] for row in older["reports"]] == [first] and older["next_cursor"] is None
    assert older["reports"][0]["schema_changed"] is None  # nothing before the first run

    html = platform.client.get(
        "/v1/pipelines/orders/reports",
        headers={**headers, "Accept": "text/html,application/xhtml+xml,*/*;q=0.8"},  # a browser's
    )
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    assert "script-src" not in html.headers["content-security-policy"]
    assert html.text.count("<svg") == 1 and f"/v1/pipelines/orders/reports/{first}" in html.text


def test_a_run_report_as_html_by_default_and_json_equal_to_the_instance_report(platform: Platform):
    headers = platform.key("pipelines:read")
    first, second = platform.runs["orders"]
    page = platform.client.get(f"/v1/pipelines/orders/reports/{first}", headers=headers)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.text.count("<svg") == 3 and "<script" not in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'none'")

    for run_id in (first, second):
        response = platform.client.get(
            f"/v1/pipelines/orders/reports/{run_id}", headers={**headers, "Accept": "application/json"}
        )
        assert response.status_code == 200, response.text
        served = response.json()
        expected = RunReport.from_facts(facts_from_instance(platform.instance, "orders", run_id)).to_json()
        assert served["links"] == {"run in the Dagster UI": f"http://testserver/runs/{run_id}"}
        assert {k: v for k, v in served.items() if k != "links"} == {
            k: v for k, v in expected.items() if k != "links"
        }
        assert served["counts_add_up"]
    assert served["schema_drift"]["added"] == [{"name": "channel", "type": "string"}]
    assert served["failed_checks"][0]["sample_bad_values"] == [-5.0]


def test_unknown_pipelines_and_runs_of_another_pipeline_are_404(platform: Platform):
    headers = {**platform.key("pipelines:read"), "Accept": "application/json"}
    [returns_run] = platform.runs["returns"]
    for path in (
        "/v1/pipelines/nope/reports",
        f"/v1/pipelines/nope/reports/{returns_run}",
        f"/v1/pipelines/orders/reports/{returns_run}",
        "/v1/pipelines/orders/reports/00000000-0000-0000-0000-000000000000",
    ):
        response = platform.client.get(path, headers=headers)
        assert response.status_code == 404, path
        assert response.headers["content-type"] == "application/problem+json"


def test_scopes_and_signed_links(platform: Platform):
    first, second = platform.runs["orders"]
    [returns_run] = platform.runs["returns"]
    other_scope = platform.key("runs:read")
    assert platform.client.get("/v1/pipelines", headers=other_scope).status_code == 403
    assert (
        platform.client.get(f"/v1/pipelines/orders/reports/{first}", headers=other_scope).status_code == 403
    )
    assert platform.client.get("/v1/pipelines").status_code == 401
    assert platform.client.get(f"/v1/pipelines/orders/reports/{first}").status_code == 401

    link = urlsplit(platform.link(first))
    assert link.path == f"/gateway/v1/pipelines/orders/reports/{first}"
    token = parse_qs(link.query)["token"][0]
    # A browser with the link and no key sees that run's report, and nothing else.
    opened = platform.client.get(f"/v1/pipelines/orders/reports/{first}", params={"token": token})
    assert opened.status_code == 200 and opened.text.count("<svg") == 3
    for path in (f"/v1/pipelines/orders/reports/{second}", f"/v1/pipelines/returns/reports/{returns_run}"):
        refused = platform.client.get(path, params={"token": token})
        assert refused.status_code == 403 and refused.headers["content-type"] == "application/problem+json"
    assert platform.client.get("/v1/pipelines/orders/reports", params={"token": token}).status_code == 401
    forged = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    assert (
        platform.client.get(f"/v1/pipelines/orders/reports/{first}", params={"token": forged}).status_code
        == 401
    )


def test_a_run_that_failed_before_staging_is_a_report_of_a_failed_run_and_a_history_row(
    platform: Platform, tmp_path: Path
):
    """The source file is gone: the run fails in the staged step before staging anything. Its report
    is served (never a 404) with its status, failed step and error and every count null, the same as
    the instance's; the history lists it in its place, paginated with the staged runs."""
    folder = tmp_path / "pipelines"
    (folder / "orders.csv").unlink()
    job = build_pipeline(load_pipelines([folder / "orders.yaml"])["orders"]).resolve_job_def(
        "orders_pipeline"
    )
    failed = job.execute_in_process(instance=platform.instance, raise_on_error=False)
    assert not failed.success
    headers = {**platform.key("pipelines:read"), "Accept": "application/json"}

    response = platform.client.get(f"/v1/pipelines/orders/reports/{failed.run_id}", headers=headers)
    assert response.status_code == 200, response.text
    served = response.json()
    assert served["status"] == "FAILURE" and served["staged_at"] is None
    assert set(served["counts"].values()) == {None} and served["score_checks"] is None
    assert served["failures"] == [
        {"step": "orders_staged", "error": f"no file matches {folder / 'orders.csv'}", "error_class": "JunctionError"}
    ]  # fmt: skip
    expected = RunReport.from_facts(facts_from_instance(platform.instance, "orders", failed.run_id)).to_json()
    assert {k: v for k, v in served.items() if k != "links"} == {
        k: v for k, v in expected.items() if k != "links"
    }
    page = platform.client.get(
        f"/v1/pipelines/orders/reports/{failed.run_id}", headers={**headers, "Accept": "text/html"}
    )
    assert page.status_code == 200 and "staged nothing" in page.text and "no file matches" in page.text

    first, second = platform.runs["orders"]
    rows = platform.client.get("/v1/pipelines/orders/reports", headers=headers).json()["reports"]
    assert [row["run_id"] for row in rows] == [failed.run_id, second, first]
    assert rows[0]["staged_at"] is None and rows[0]["rows_read"] is None and rows[0]["status"] == "FAILURE"
    assert rows[0]["failed_step"] == "orders_staged" and rows[0]["error"].startswith("no file matches")
    assert rows[0]["url"].endswith(f"/v1/pipelines/orders/reports/{failed.run_id}")
    paged, cursor = [], None
    while True:
        params = {"limit": 1, **({"before": cursor} if cursor else {})}
        page_json = platform.client.get("/v1/pipelines/orders/reports", params=params, headers=headers).json()
        paged += [row["run_id"] for row in page_json["reports"]]
        cursor = page_json["next_cursor"]
        if cursor is None:
            break
    assert paged == [failed.run_id, second, first]
    # The UI's Materialize on the staged asset alone: the implicit asset job, no pipeline tag; its
    # asset selection makes it a run of the pipeline.
    untagged = (
        build_pipeline(load_pipelines([folder / "orders.yaml"])["orders"])
        .resolve_implicit_global_asset_job_def()
        .get_subset(asset_selection={dg.AssetKey("orders_staged")})
        .execute_in_process(instance=platform.instance, raise_on_error=False)
    )
    assert not untagged.success
    response = platform.client.get(f"/v1/pipelines/orders/reports/{untagged.run_id}", headers=headers)
    assert response.status_code == 200 and response.json()["failures"][0]["step"] == "orders_staged"
    # Another pipeline's run stays a 404 here.
    [returns_run] = platform.runs["returns"]
    assert (
        platform.client.get(f"/v1/pipelines/orders/reports/{returns_run}", headers=headers).status_code == 404
    )
