"""The quality report: built from what real pipeline runs recorded in a real Dagster instance.

Two runs of one small pipeline go through `junction pipelines run`'s instance (DAGSTER_HOME under the
test's JUNCTION_HOME): the first succeeds with a quarantined value, a filtered row and a failing warn
rule; the second adds a column (drift) and fails a blocking rule. The report's figures are compared
with the runs' own metadata and check evaluations, and with the inputs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import dagster as dg
import pytest
import yaml
from click.testing import CliRunner

from assets.etl.factory import build_pipeline
from assets.etl.report import (
    QUALITY_REPORT,
    REPORT_LINK_PURPOSE,
    RunReport,
    facts_from_instance,
    history_from_instance,
    render_history_html,
    render_report_html,
)
from assets.etl.spec import load_pipelines
from orchestration.cli import cli
from orchestration.kernel.signed_links import verify_permanent

XSS = "<script>alert(1)</script>"
FIRST = [
    "id,customer,amount,status",
    "1,alice,10.5,paid",
    "2,bob,not-a-number,paid",  # quarantined by the cast
    "3,carol,7,cancelled",  # filtered
    "4,dave,3.25,paid",
    f"5,{XSS},8,paid",  # fails the warn rule customer_lowercase: its sample must be escaped in HTML
]
# A new column (drift) and two of three amounts negative: the blocking rule fails.
SECOND = [
    "id,customer,amount,status,channel",
    "1,alice,-1,paid,web",
    "2,bob,-2,paid,shop",
    "3,carol,4,paid,web",
]


def write_spec(folder: Path, target: dict) -> None:
    spec = {
        "source": {"format": "csv", "path": "orders.csv"},
        "transforms": [
            {"cast": {"id": "int64", "amount": "float64"}},
            {"filter": {"field": "status", "op": "ne", "value": "cancelled"}},
        ],
        "rules": [
            {"name": "amount_positive", "condition": {"field": "amount", "op": "gt", "value": 0}, "blocking": True, "mostly": 0.6},
            {"name": "customer_lowercase", "condition": {"field": "customer", "op": "matches", "value": "^[a-z]+$"}, "severity": "warn"},
        ],
        "contract": {"columns": {"id": {"type": "int64", "required": True, "unique": True}}},
        "target": target,
        "load": {"mode": "replace"},
        "group": "sales",
    }  # fmt: skip
    (folder / "orders.yaml").write_text(yaml.safe_dump(spec))


def write_input(folder: Path, rows: list[str]) -> None:
    (folder / "orders.csv").write_text("\n".join(rows) + "\n")


@pytest.fixture
def pipelines_dir(pipelines_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The ETL tests' folder, with a public URL the report links are checked against."""
    from orchestration.settings import reset_settings_cache

    monkeypatch.setenv("JUNCTION_PUBLIC_URL", "https://junction.example/")
    reset_settings_cache()
    return pipelines_dir


def run_twice(folder: Path) -> tuple[dg.DagsterInstance, str, str]:
    """Both runs in the platform's instance; returns it (open) and the two run ids."""
    from orchestration.instance import prepare_dagster_home

    prepare_dagster_home()
    instance = dg.DagsterInstance.get()
    job = build_pipeline(load_pipelines([folder / "orders.yaml"])["orders"]).resolve_job_def(
        "orders_pipeline"
    )
    write_input(folder, FIRST)
    first = job.execute_in_process(instance=instance, raise_on_error=False)
    assert first.success
    write_input(folder, SECOND)
    second = job.execute_in_process(instance=instance, raise_on_error=False)
    assert not second.success
    return instance, first.run_id, second.run_id


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_the_report_of_real_runs_adds_up_matches_the_runs_and_renders_escaped(
    backend: str, pipelines_dir: Path, tmp_path: Path, request: pytest.FixtureRequest
):
    url = (
        f"sqlite:///{tmp_path / 'warehouse.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("clean_postgres_url")
    )
    write_spec(pipelines_dir, {"kind": "sql", "url": url, "table": "orders"})
    instance, first_id, second_id = run_twice(pipelines_dir)
    try:
        first_facts = facts_from_instance(instance, "orders", first_id)
        newest_facts = facts_from_instance(instance, "orders")
        history = history_from_instance(instance, "orders")
        assert facts_from_instance(instance, "nope") is None
        assert facts_from_instance(instance, "orders", "00000000-0000-0000-0000-000000000000") is None
    finally:
        instance.dispose()
    assert first_facts is not None and newest_facts is not None
    report = RunReport.from_facts(first_facts)

    # Counts: 5 read = 3 loaded + 1 filtered + 1 quarantined; of the 4 meant to load, alice and dave
    # pass every check (the <script> customer fails a rule, bob was quarantined).
    assert report.counts == {
        "read": 5, "filtered": 1, "quarantined": 1, "loaded": 3, "valid": 2, "published": 3
    }  # fmt: skip
    assert report.counts_add_up
    assert sum(report.rows_by_outcome.values()) == report.counts["read"]
    assert report.rows_by_outcome["loaded, failing a check"] == 1
    assert (
        report.score_rows == pytest.approx(2 / 4)
        and report.score_rows == first_facts.staged["quality_score_rows"]
    )
    # 5 checks: amount_positive, customer_lowercase, id_type, id_required, id_unique; one failed (warn).
    assert (report.checks_total, report.checks_passed) == (5, 4)
    assert report.score_checks == pytest.approx(4 / 5)
    [failed] = report.failed_checks
    assert (
        failed["name"] == "customer_lowercase"
        and failed["severity"] == "WARN"
        and failed["blocking"] is False
    )
    assert failed["sample_bad_values"] == [XSS] and failed["rows_failed"] == 1
    assert report.quarantine_by_reason == [
        {"step": "transforms[0].cast", "field": "amount", "rows": 1, "example": report.quarantine_by_reason[0]["example"]}
    ]  # fmt: skip
    assert "not-a-number" in report.quarantine_by_reason[0]["example"]
    assert report.filtered_by_step == {"transforms[1].filter": 1}
    assert [stage.name for stage in report.stages] == ["read and transform", "stage", "validate", "publish"]
    assert all(stage.seconds is not None and stage.seconds >= 0 for stage in report.stages)
    assert report.stages[0].rows == 5 and report.stages[-1].rows == 3
    assert report.status == "SUCCESS" and report.schema_drift["source"] == "no previous run"
    assert report.target == f"{'postgres' if backend == 'postgres' else 'sqlite'} table orders"

    # The link in the metadata: the public URL, the gateway path, a token for exactly this run.
    link = urlsplit(first_facts.staged[QUALITY_REPORT])
    assert f"{link.scheme}://{link.netloc}{link.path}" == (
        f"https://junction.example/gateway/v1/pipelines/orders/reports/{first_id}"
    )
    token = parse_qs(link.query)["token"][0]
    assert verify_permanent(REPORT_LINK_PURPOSE, token) == {"pipeline": "orders", "run_id": first_id}
    # The published asset (what people open most in the UI) links to the same report.
    assert first_facts.published[QUALITY_REPORT] == first_facts.staged[QUALITY_REPORT]

    # The second run: newest by default, failed on the blocking rule, a column added, nothing published.
    newest = RunReport.from_facts(newest_facts)
    assert newest.run_id == second_id and newest.status == "FAILURE"
    assert newest.schema_drift["added"] == [{"name": "channel", "type": "string"}]
    assert newest.schema_drift["removed"] == newest.schema_drift["retyped"] == []
    assert [c["name"] for c in newest.failed_checks] == ["amount_positive"]
    assert newest.failed_checks[0]["blocking"] is True
    assert sorted(newest.failed_checks[0]["sample_bad_values"]) == [-2.0, -1.0]
    assert newest.counts["published"] == 0 and newest.stages[-1].name == "validate"
    assert newest.counts_add_up and newest.counts["read"] == 3

    page = render_report_html(report)
    assert page.count("<svg") == 3  # rows by outcome, quarantine by reason, stage durations
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "http" not in re.sub(r'xmlns(:\w+)?="http[^"]+"', "", page)  # self-contained: no outside URL
    json.dumps(report.to_json())  # the JSON form is plain data

    assert [row.run_id for row in history] == [second_id, first_id]
    assert [row.schema_changed for row in history] == [True, None]
    assert history[1].score_checks == report.score_checks and history[0].status == "FAILURE"
    for row in history:
        row.url = f"/r/{row.run_id}"
    history_page = render_history_html("orders", history)
    assert history_page.count("<svg") == 1 and f'href="/r/{first_id}"' in history_page
    assert "<script" not in history_page


def test_cli_report_prints_the_summary_and_writes_html_and_json(pipelines_dir: Path, tmp_path: Path):
    write_spec(pipelines_dir, {"kind": "file", "format": "parquet", "path": "warehouse/orders.parquet"})
    run_ids = []
    for rows, exit_code in ((FIRST, 0), (SECOND, 1)):
        write_input(pipelines_dir, rows)
        ran = CliRunner().invoke(cli, ["pipelines", "run", "orders"])
        assert ran.exit_code == exit_code, ran.output
        run_ids.append(re.search(r"^run (\S+):", ran.stdout, re.MULTILINE).group(1))
        # `pipelines run` prints the link to the run's report.
        assert (
            f"quality report: https://junction.example/gateway/v1/pipelines/orders/reports/{run_ids[-1]}?token="
            in ran.stdout
        )
    first_id, second_id = run_ids

    newest = CliRunner().invoke(cli, ["pipelines", "report", "orders"])
    assert newest.exit_code == 0, newest.output
    assert f"run {second_id} (FAILURE)" in newest.output
    assert "failed: amount_positive (ERROR, blocking): 2 rows" in newest.output
    assert "schema drift: added channel string" in newest.output
    assert "quality report: https://junction.example/gateway/v1/pipelines/orders/reports/" in newest.output

    output = tmp_path / "report.html"
    first = CliRunner().invoke(
        cli, ["pipelines", "report", "orders", "--run-id", first_id, "--output", str(output), "--json"]
    )
    assert first.exit_code == 0, first.output
    document = json.loads(first.stdout)
    assert document["run_id"] == first_id and document["counts"]["quarantined"] == 1
    assert output.read_text().count("<svg") == 3

    missing = CliRunner().invoke(cli, ["pipelines", "report", "orders", "--run-id", "nope"])
    assert missing.exit_code == 1 and "no report of pipeline 'orders' for run nope" in missing.output
    unknown = CliRunner().invoke(cli, ["pipelines", "report", "nope"])
    assert unknown.exit_code == 1 and "no pipeline named 'nope'" in unknown.output


def test_drift_recorded_by_the_run_wins_over_the_schema_comparison_and_renders(junction_home: Path):
    """The factory's drift step records mappings; the report shows them in its own list shape."""
    from assets.etl.report import RunFacts

    recorded = {
        "policy": "discard_value",
        "added": {"channel": "string"},
        "removed": {"note": "string"},
        "retyped": {"amount": {"target": "double", "incoming": "string"}},
        "values_discarded": 2,
    }
    staged = {"rows_read": 2, "rows_loaded": 2, "schema_drift": recorded, "dagster/column_schema": [{"name": "id", "type": "int64"}]}  # fmt: skip
    facts = RunFacts("orders", "r1", "SUCCESS", None, None, 1.0, staged, None, [], previous_columns=[])
    report = RunReport.from_facts(facts)
    assert report.schema_drift["added"] == [{"name": "channel", "type": "string"}]
    assert report.schema_drift["removed"] == [{"name": "note", "type": "string"}]
    assert report.schema_drift["retyped"] == [{"name": "amount", "from": "double", "to": "string"}]
    assert report.schema_drift["policy"] == "discard_value" and report.schema_drift["values_discarded"] == 2
    assert (
        "added channel string; removed note string; retyped amount double -> string" in report.summary_text()
    )
    page = render_report_html(report)
    assert "(policy discard_value)" in page and "double → string" in page


def test_a_run_that_failed_before_staging_is_reported_as_failed_with_its_error_and_unknown_counts(
    pipelines_dir: Path,
):
    """Run for real through `junction pipelines run`: a missing source file fails the staged step
    before anything is staged; then a `freeze` contract refuses a new column. Both are reports of
    failed runs - status, failed step, error - with counts unknown, never zero, in the CLI, the
    JSON, the HTML page and the history."""
    write_spec(pipelines_dir, {"kind": "file", "format": "parquet", "path": "warehouse/orders.parquet"})
    run_ids = []

    def run_cli() -> str:
        ran = CliRunner().invoke(cli, ["pipelines", "run", "orders"])
        run_ids.append(re.search(r"^run (\S+):", ran.stdout, re.MULTILINE).group(1))
        return ran.output

    write_input(pipelines_dir, FIRST)
    run_cli()
    (pipelines_dir / "orders.csv").unlink()
    # The CLI says why in one line and where the full log is, never with a traceback.
    failed = run_cli()
    assert "Traceback" not in failed
    error, log_line, report_line = failed.rstrip().splitlines()[-3:]
    assert error == (
        f"Error: run {run_ids[-1]} failed: step orders_staged failed: no file matches {pipelines_dir / 'orders.csv'}"
    )
    log_file = Path(log_line.removeprefix("full log: ").split(" (and ")[0])
    assert log_file.name == f"{run_ids[-1]}.log" and "JunctionError" in log_file.read_text()
    assert report_line == f"report: junction pipelines report orders --run-id {run_ids[-1]}"
    spec = yaml.safe_load((pipelines_dir / "orders.yaml").read_text())
    spec["contract"]["drift"] = "freeze"
    (pipelines_dir / "orders.yaml").write_text(yaml.safe_dump(spec))
    write_input(pipelines_dir, SECOND)  # brings the column `channel`
    run_cli()
    staged_id, missing_id, frozen_id = run_ids

    newest = CliRunner().invoke(cli, ["pipelines", "report", "orders"])  # the newest run: the frozen one
    assert newest.exit_code == 0, newest.output
    assert f"run {frozen_id} (FAILURE), staged nothing" in newest.output
    assert "failed step orders_staged: Failure: contract.drift:" in newest.output
    assert "rows: unknown (the run recorded no staged materialization)" in newest.output
    assert "schema drift: added channel string" in newest.output

    missing = CliRunner().invoke(cli, ["pipelines", "report", "orders", "--run-id", missing_id, "--json"])
    assert missing.exit_code == 0, missing.output
    document = json.loads(missing.stdout)
    assert document["status"] == "FAILURE" and document["staged_at"] is None
    assert document["counts"] == dict.fromkeys(
        ("read", "filtered", "quarantined", "loaded", "valid", "published")
    )
    assert document["score_checks"] is None and document["score_rows"] is None
    assert document["counts_add_up"] is None and document["checks_total"] == 0
    [failure] = document["failures"]
    assert failure["step"] == "orders_staged" and failure["error_class"] == "JunctionError"
    assert failure["error"] == f"no file matches {pipelines_dir / 'orders.csv'}"

    from orchestration.instance import prepare_dagster_home

    prepare_dagster_home()
    with dg.DagsterInstance.get() as instance:
        history = history_from_instance(instance, "orders")
        report = RunReport.from_facts(facts_from_instance(instance, "orders", missing_id))
    assert [row.run_id for row in history] == [frozen_id, missing_id, staged_id]
    assert [row.staged_at is None for row in history] == [True, True, False]
    assert history[1].failed_step == "orders_staged" and history[1].error == failure["error"]
    assert history[1].rows_read is None and history[1].score_checks is None and history[1].ended_at
    assert history[2].rows_read == 5 and history[2].failed_step is None

    page = render_report_html(report)
    assert "staged nothing" in page and "no file matches" in page and "JunctionError" in page
    assert "<svg" not in page  # no figure to draw
    history_page = render_history_html("orders", history)
    assert history_page.count("staged nothing") == 2 and "orders_staged: no file matches" in history_page


def test_bar_charts_have_compact_ticks_and_value_labels_past_each_bar():
    """Value labels used to sit centred on their bars (a small bar's on the axis) and long ticks were
    cut (`100,0…`)."""
    from xml.etree import ElementTree

    from assets.etl.report import _bar

    root = ElementTree.fromstring(_bar("Rows", {"loaded": 250_000, "filtered": 3, "quarantined": 1_200}))
    ns = "{http://www.w3.org/2000/svg}"
    ticks = [
        t.text for g in root.iter(f"{ns}g") if "axis x" in (g.get("class") or "") for t in g.iter(f"{ns}text")
    ]
    assert "200k" in ticks and all("," not in tick and "…" not in tick for tick in ticks)
    bars = {}
    labels = {}
    for group in root.iter(f"{ns}g"):
        serie = " ".join((group.get("class") or "").split()[:2])
        if not serie.startswith("series "):
            continue
        for rect in group.iter(f"{ns}rect"):
            bars[serie] = float(rect.get("x")) + float(rect.get("width"))
        for text in group.iter(f"{ns}text"):
            if text.get("class") == "value":
                labels[text.text] = (serie, float(text.get("x")), text.get("text-anchor"))
    assert set(labels) == {"250,000", "3", "1,200"}
    width = float(root.get("viewBox").split()[2])
    for text, (serie, x, anchor) in labels.items():
        assert anchor == "start" and x > bars[serie], text
        # Inside the chart with room for the text (~8 px a character at this size).
        assert x + 8 * len(text) < width - 40, text
