"""The pipeline spec: every bad spec names its file, field and reason; all problems are reported at once."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from assets.etl.spec import PipelineSpec, json_schema, load_pipelines, parse_arrow_type
from orchestration.kernel.spec_errors import SpecError

SHIPPED = Path(__file__).resolve().parents[2] / "assets" / "pipelines"
MINIMAL = {"source": {"format": "csv", "path": "orders.csv"}}


def write_spec(directory: Path, name: str, data: dict) -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def problems_of(tmp_path: Path, data: dict, name: str = "orders") -> list[str]:
    path = write_spec(tmp_path, name, data)
    with pytest.raises(SpecError) as caught:
        load_pipelines([path])
    return [str(problem).removeprefix(f"{path}: ") for problem in caught.value.problems]


BAD_SPECS = [
    pytest.param(
        {
            **MINIMAL,
            "transforms": [{"select": ["a"]}, {"rename": {"a": "b"}}, {"cast": {"amount": "moneyy"}}],
        },
        "transforms[2].cast.amount: unknown type 'moneyy'",
        id="unknown-type",
    ),
    pytest.param(
        {
            **MINIMAL,
            "transforms": [
                {"filter": {"all": [{"field": "a", "op": "exists"}, {"field": "b", "op": "bigger"}]}}
            ],
        },
        "transforms[0].filter.all[1].op: unknown operator 'bigger'",
        id="condition-operator",
    ),
    pytest.param(
        {**MINIMAL, "transforms": [{"derive": {"total": "amount *"}}]},
        "transforms[0].derive.total: syntax error",
        id="expression-syntax",
    ),
    pytest.param(
        {**MINIMAL, "transforms": [{"derive": {"total": "explode(amount)"}}]},
        "transforms[0].derive.total: unknown function 'explode'",
        id="expression-function",
    ),
    pytest.param(
        {**MINIMAL, "transforms": [{"castt": {"a": "int"}}]},
        "transforms[0].castt: unknown field",
        id="step-kind",
    ),
    pytest.param(
        {**MINIMAL, "transforms": [{"cast": {"a": "int"}, "select": ["a"]}]},
        "transforms[0]: a step is one of",
        id="two-kinds-in-one-step",
    ),
    pytest.param(
        {**MINIMAL, "transforms": [{"cleanse": {"replace": [{"pattern": "(a)\\1", "with": "x"}]}}]},
        "transforms[0].cleanse.replace[0].pattern: invalid regular expression",
        id="regex-re2",
    ),
    pytest.param(
        {**MINIMAL, "transforms": [{"dedupe": {"keys": ["id"], "keep": "middle"}}]},
        "transforms[0].dedupe.keep: Input should be 'first' or 'last'",
        id="dedupe-keep",
    ),
    pytest.param(
        {**MINIMAL, "transforms": [{"python": {"function": "not a path"}}]},
        "transforms[0].python.function: String should match pattern",
        id="python-path",
    ),
    pytest.param(
        {"source": {"format": "xlsx", "path": "a.xlsx"}}, "source.format: Input should be", id="format"
    ),
    pytest.param(
        {"source": {"format": "csv", "path": "a", "encoding": "utf-9"}},
        "source.encoding: unknown encoding 'utf-9'",
        id="encoding",
    ),
    pytest.param(
        {"source": {"format": "json", "path": "a", "csv": {"delimiter": ";"}}},
        "source: csv options do not apply to format 'json'",
        id="csv-options-on-json",
    ),
    pytest.param(
        {"source": {"format": "csv", "path": "a", "csv": {"delimiter": ";;"}}},
        "source.csv.delimiter:",
        id="delimiter",
    ),
    pytest.param(
        {"source": {"kind": "ftp", "path": "a"}},
        "source: kind must be 'file' or 'sql' or 'asset' or 'rest', got 'ftp'",
        id="source-kind",
    ),
    pytest.param(
        {"source": {"kind": "sql", "table": "t"}}, "source: give exactly one of url and url_env", id="sql-url"
    ),
    pytest.param(
        {"source": {"kind": "sql", "url": "sqlite://", "table": "t", "query": "select 1"}},
        "source: give exactly one of table and query",
        id="sql-table-and-query",
    ),
    pytest.param({**MINIMAL, "load": {"mode": "merge"}}, "load: merge needs keys", id="merge-keys"),
    pytest.param(
        {**MINIMAL, "load": {"mode": "append", "keys": ["id"]}},
        "load: keys only apply to merge",
        id="append-keys",
    ),
    pytest.param(
        {**MINIMAL, "target": {"kind": "sql", "url": "sqlite://", "table": "bad name"}},
        "target.table: String should match",
        id="target-table",
    ),
    pytest.param(
        {**MINIMAL, "schedule": "every day"}, "schedule: 'every day' is not a cron expression", id="cron"
    ),
    pytest.param(
        {**MINIMAL, "timezone": "Mars/Olympus"}, "timezone: unknown time zone 'Mars/Olympus'", id="timezone"
    ),
    pytest.param(
        {**MINIMAL, "batch_size": 0},
        "batch_size: Input should be greater than or equal to 1",
        id="batch-size",
    ),
    pytest.param(
        {**MINIMAL, "rules": [{"name": "r", "condition": {"field": "a", "op": "exists"}}] * 2},
        "rules: rule names must be unique: r",
        id="rule-names",
    ),
    pytest.param(
        {**MINIMAL, "rules": [{"name": "r", "condition": {"field": "a", "op": "gt", "value": None}}]},
        "rules[0].condition.value:",
        id="rule-condition",
    ),
    pytest.param(
        {**MINIMAL, "contract": {"drift": "ignore"}},
        "contract.drift: Input should be 'evolve', 'freeze', 'discard_row' or 'discard_value'",
        id="drift-policy",
    ),
    pytest.param(
        {**MINIMAL, "contract": {"columns": {"amount": {"type": "money", "min": 5, "max": 1}}}},
        "contract.columns.amount.type: unknown type 'money'",
        id="contract-type",
    ),
    pytest.param(
        {**MINIMAL, "contract": {"columns": {"amount": {"min": 5, "max": 1}}}},
        "contract.columns.amount: min (5) is greater than max (1)",
        id="contract-range",
    ),
    pytest.param(
        {
            **MINIMAL,
            "triggers": [
                {"stream": "orders", "condition": {"field": "x", "op": "matches", "value": "(?=a)"}}
            ],
        },
        "triggers[0].condition.value: invalid regular expression",
        id="trigger-condition",
    ),
    pytest.param({**MINIMAL, "owner": "me"}, "owner: unknown field", id="unknown-top-level"),
    # enrich and aggregate
    pytest.param(
        {
            **MINIMAL,
            "transforms": [
                {"select": ["carrier", "month", "dep_delay"]},
                {"cast": {"dep_delay": "float64"}},
                {"derive": {"late": "dep_delay > 15"}},
                {"aggregate": {"by": ["carrier"], "metrics": {"delay": {"fn": "avg", "field": "dep_delay"}}}},
            ],
        },
        "transforms[3].aggregate.metrics.delay.fn: unknown function 'avg'; "
        "use one of count, sum, mean, min, max, first, last",
        id="aggregate-function",
    ),
    pytest.param(
        {**MINIMAL, "transforms": [{"aggregate": {"by": ["a"], "metrics": {"m": {"fn": "mean"}}}}]},
        "transforms[0].aggregate.metrics.m: mean needs a field",
        id="aggregate-field",
    ),
    pytest.param(
        {**MINIMAL, "transforms": [{"aggregate": {"by": ["a"], "metrics": {"a": {"fn": "count"}}}}]},
        "transforms[0].aggregate: metric 'a' has the name of a grouping field",
        id="aggregate-metric-name",
    ),
    pytest.param(
        {**MINIMAL, "transforms": [{"aggregate": {"by": [], "metrics": {"n": {"fn": "count"}}}}]},
        "transforms[0].aggregate.by: List should have at least 1 item",
        id="aggregate-by",
    ),
    pytest.param(
        {
            **MINIMAL,
            "transforms": [
                {"select": ["carrier", "dep_delay"]},
                {"aggregate": {"by": ["carrier", "origin"], "metrics": {"n": {"fn": "count"}}}},
            ],
        },
        "transforms[1].aggregate.by[1]: no field 'origin' here (the fields are carrier, dep_delay)",
        id="aggregate-unknown-field",
    ),
    pytest.param(
        {
            **MINIMAL,
            "transforms": [
                {"aggregate": {"by": ["carrier"], "metrics": {"n": {"fn": "count"}}}},
                {"filter": {"field": "n", "op": "gt", "value": 1}},
                {"dedupe": {"keys": ["month"]}},
            ],
        },
        "transforms[2].dedupe.keys[0]: no field 'month' here (the fields are carrier, n)",
        id="after-aggregate-unknown-field",
    ),
    pytest.param(
        {
            **MINIMAL,
            "transforms": [{"aggregate": {"by": ["carrier"], "metrics": {"n": {"fn": "count"}}}}],
            "load": {"mode": "merge", "keys": ["carrier", "month"]},
        },
        "load.keys[1]: no field 'month' here (the fields are carrier, n)",
        id="merge-key-after-aggregate",
    ),
    pytest.param(
        {
            **MINIMAL,
            "transforms": [{"enrich": {"lookup": {"format": "csv", "path": "l.csv"}, "on": []}}],
        },
        "transforms[0].enrich.on: name at least one key field",
        id="enrich-no-keys",
    ),
    pytest.param(
        {
            **MINIMAL,
            "transforms": [
                {"enrich": {"lookup": {"format": "csv", "path": "l.csv"}, "on": ["a"], "unmatched": "ignore"}}
            ],
        },
        "transforms[0].enrich.unmatched: Input should be 'keep', 'drop' or 'quarantine'",
        id="enrich-unmatched",
    ),
    pytest.param(
        {
            **MINIMAL,
            "transforms": [
                {
                    "enrich": {
                        "lookup": {"format": "csv", "path": "l.csv"},
                        "on": ["a"],
                        "lookup_duplicates": "last",
                    }
                }
            ],
        },
        "transforms[0].enrich.lookup_duplicates: Input should be 'error' or 'first'",
        id="enrich-duplicates",
    ),
    pytest.param(
        {
            **MINIMAL,
            "transforms": [{"enrich": {"lookup": {"format": "xls", "path": "l.xls"}, "on": ["a"]}}],
        },
        "transforms[0].enrich.lookup.format: Input should be",
        id="enrich-lookup-format",
    ),
    pytest.param(
        {
            **MINIMAL,
            "transforms": [
                {"select": ["id", "name"]},
                {"enrich": {"lookup": {"format": "csv", "path": "l.csv"}, "on": {"customer": "id"}}},
            ],
        },
        "transforms[1].enrich.on.customer: no field 'customer' here (the fields are id, name)",
        id="enrich-unknown-key",
    ),
    pytest.param(
        {
            **MINIMAL,
            "transforms": [
                {"select": ["id", "name"]},
                {"enrich": {"lookup": {"format": "csv", "path": "l.csv"}, "on": ["id"], "columns": ["name"]}},
            ],
        },
        "transforms[1].enrich.columns: 'name' is a field already; set a prefix (or select)",
        id="enrich-column-clash",
    ),
    pytest.param(
        {"source": {"kind": "asset"}},
        "source: give exactly one of pipeline and asset",
        id="asset-source-reference",
    ),
    pytest.param(
        {"source": {"kind": "asset", "pipeline": "bad name"}},
        "source.pipeline: String should match pattern",
        id="asset-source-name",
    ),
]


@pytest.mark.parametrize(("data", "expected"), BAD_SPECS)
def test_a_bad_spec_names_the_field_and_the_reason(tmp_path: Path, data: dict, expected: str):
    problems = problems_of(tmp_path, data)
    assert any(problem.startswith(expected) for problem in problems), problems


def test_every_problem_of_every_file_is_reported_at_once(tmp_path: Path):
    first = write_spec(
        tmp_path,
        "orders",
        {**MINIMAL, "transforms": [{"cast": {"amount": "moneyy"}}, {"filter": {"field": "a", "op": "nope"}}]},
    )
    second = write_spec(tmp_path, "customers", {"source": {"format": "csv"}, "schedule": "never"})
    (tmp_path / "broken.yaml").write_text("source: [unclosed\n")
    with pytest.raises(SpecError) as caught:
        load_pipelines(sorted(tmp_path.glob("*.yaml")))
    lines = str(caught.value).splitlines()
    assert f"{first}: transforms[0].cast.amount: unknown type 'moneyy'" in lines
    assert any(
        line.startswith(f"{first}: transforms[1].filter.op: unknown operator 'nope'") for line in lines
    )
    assert f"{second}: source.path: Field required" in lines
    assert any(line.startswith(f"{second}: schedule:") for line in lines)
    assert any(line.startswith(f"{tmp_path / 'broken.yaml'}: line ") for line in lines)
    assert len(lines) == 5


def test_names_default_to_the_file_name_and_must_be_unique(tmp_path: Path):
    write_spec(tmp_path, "orders", MINIMAL)
    assert list(load_pipelines([tmp_path / "orders.yaml"])) == ["orders"]
    write_spec(tmp_path, "orders_v2", {**MINIMAL, "name": "orders"})
    with pytest.raises(SpecError, match="'orders' is also the name of"):
        load_pipelines(sorted(tmp_path.glob("*.yaml")))
    write_spec(tmp_path, "bad-name", MINIMAL)
    with pytest.raises(SpecError, match="cannot name a pipeline"):
        load_pipelines([tmp_path / "bad-name.yaml"])


def test_the_loader_reads_the_settings_folder(
    junction_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from orchestration.settings import reset_settings_cache

    folder = tmp_path / "specs"
    folder.mkdir()
    write_spec(folder, "a", MINIMAL)
    write_spec(
        folder,
        "b",
        {**MINIMAL, "source": {"kind": "sql", "url": "sqlite://", "query": "select :x", "params": {"x": 1}}},
    )
    (folder / "notes.txt").write_text("not a spec")
    monkeypatch.setenv("JUNCTION_PIPELINES_DIR", str(folder))
    reset_settings_cache()
    assert sorted(load_pipelines()) == ["a", "b"]


def test_a_full_spec_round_trips_with_parsed_conditions_and_expressions():
    spec = PipelineSpec.model_validate(
        {
            **MINIMAL,
            "transforms": [
                {"derive": {"total": "amount * 2"}},
                {"filter": {"field": "total", "op": "gt", "value": 1}},
                {"cleanse": {"replace": [{"pattern": "a+", "with": "a"}]}},
            ],
            "triggers": [
                {"stream": "orders", "condition": {"field": "type", "op": "eq", "value": "created"}}
            ],
        }
    )
    assert spec.transforms[0].kind == "derive"
    assert type(spec.transforms[0].derive["total"].tree).__name__ == "Operation"
    assert type(spec.transforms[1].filter.tree).__name__ == "Predicate"
    dumped = spec.model_dump(by_alias=True)
    assert dumped["transforms"][1]["filter"] == {"field": "total", "op": "gt", "value": 1}
    assert dumped["transforms"][2]["cleanse"]["replace"] == [{"pattern": "a+", "with": "a"}]
    assert PipelineSpec.model_validate(dumped) == spec


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("int", pa.int64()),
        ("float32", pa.float32()),
        ("double", pa.float64()),
        ("boolean", pa.bool_()),
        ("date", pa.date32()),
        ("timestamp", pa.timestamp("us")),
        ("timestamp[ms, Europe/Paris]", pa.timestamp("ms", "Europe/Paris")),
        ("decimal(12, 2)", pa.decimal128(12, 2)),
        ("decimal(50,10)", pa.decimal256(50, 10)),
    ],
)
def test_type_names(name: str, expected: pa.DataType):
    assert parse_arrow_type(name) == expected


def test_enrich_keys_as_a_list_or_a_mapping_and_the_yaml_boolean_on():
    spec = load_spec_text(
        "source: {format: csv, path: a.csv}\n"
        "transforms:\n"
        "  - enrich: {lookup: {format: csv, path: l.csv}, on: [carrier]}\n"
        "  - enrich: {lookup: {format: csv, path: l.csv}, on: {origin: faa}, columns: [name], prefix: o_}\n"
    )
    # PyYAML reads a bare `on` as true; the spec takes it as `on`.
    assert spec.transforms[0].enrich.on == {"carrier": "carrier"}
    assert spec.transforms[1].enrich.on == {"origin": "faa"}
    assert spec.transforms[1].enrich.added_columns == ["o_name"]
    assert PipelineSpec.model_validate(spec.model_dump(by_alias=True)) == spec


def load_spec_text(text: str) -> PipelineSpec:
    return PipelineSpec.model_validate(yaml.safe_load(text))


def test_the_shipped_specs_are_valid_and_match_the_exported_json_schema():
    import jsonschema

    loaded = load_pipelines(sorted(SHIPPED.glob("*.yaml")))
    assert {"flights", "flight_delays"} <= set(loaded)
    assert list(loaded["flight_delays"].upstream) == ["flights"]
    schema = json_schema()
    validator = jsonschema.Draft202012Validator(schema)
    for pipeline in loaded.values():
        document = yaml.safe_load(pipeline.file.read_text())
        assert list(validator.iter_errors(document)) == []
    # The schema rejects what the model rejects (unknown fields are closed in both).
    assert list(validator.iter_errors({**MINIMAL, "owner": "me"}))
