"""The streams registry: YAML declarations (kernel error format), sync into the store, the API path."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestration.kernel.spec_errors import SpecError
from orchestration.settings import PROJECT_ROOT
from orchestration.store import get_engine
from resources.event_stream import (
    StreamDefinition,
    StreamNotFound,
    StreamOwnedElsewhere,
    StreamRegistry,
    StreamSpec,
    load_stream_specs,
)
from resources.event_stream.registry import compile_schema


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def test_the_shipped_orders_stream_loads_and_validates():
    specs = load_stream_specs(PROJECT_ROOT / "sensors" / "streams")
    orders = next(spec for spec in specs.values() if spec.name == "orders")
    assert orders.retention.max_count == 1_000_000 and orders.retention.max_age == 30 * 86400
    assert orders.idempotency_window == 86400


def test_payload_problems_name_their_place_and_formats_are_checked():
    schema = {
        "type": "object",
        "required": ["at"],
        "properties": {
            "at": {"type": "string", "format": "date-time"},
            "items": {
                "type": "array",
                "items": {"type": "object", "properties": {"sku": {"type": "string"}}},
            },
        },
    }
    orders = StreamDefinition(name="orders", payload_schema=schema)
    assert orders.validation_error({"at": "2026-11-28T17:00:00Z", "items": [{"sku": "a"}]}) is None
    assert orders.validation_error({}) == 'payload: "at" is a required property'
    assert orders.validation_error({"at": "Tuesday"}) == 'payload.at: "Tuesday" is not a "date-time"'
    assert (
        orders.validation_error({"at": "2026-11-28T17:00:00Z", "items": [{"sku": "a"}, {"sku": 5}]})
        == 'payload.items[1].sku: 5 is not of type "string"'
    )
    # A declared dialect is honoured (2020-12 `prefixItems`), and formats are asserted in it too.
    tuple_schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "prefixItems": [{"type": "string", "format": "email"}],
    }
    pairs = StreamDefinition(name="pairs", payload_schema=tuple_schema)
    assert pairs.validation_error(["a@example.com", 1]) is None
    assert pairs.validation_error(["nobody"]) == 'payload[0]: "nobody" is not a "email"'


def test_every_problem_names_file_field_and_reason(tmp_path: Path):
    folder = tmp_path / "streams"
    bad = write(
        folder,
        "bad.yaml",
        "name: Bad Name\nretention: {max_count: 0, max_age: forever}\nextra: 1\n"
        "payload_schema: {type: nonsense}\nidempotency_window: -5\n",
    )
    first = write(folder, "a.yaml", "name: orders\n")
    second = write(folder, "b.yml", "name: orders\n")
    broken = write(folder, "broken.yaml", "name: [unclosed\n")

    with pytest.raises(SpecError) as caught:
        load_stream_specs(folder)
    lines = str(caught.value).splitlines()
    assert f"{bad}: name: must be 1-150 characters" in "\n".join(lines)
    assert f"{bad}: retention.max_count: Input should be greater than or equal to 1" in lines
    assert any(line.startswith(f"{bad}: retention.max_age: 'forever' is not a duration") for line in lines)
    assert f"{bad}: extra: unknown field" in lines
    assert any(line.startswith(f"{bad}: payload_schema: not a valid JSON Schema") for line in lines)
    assert f"{bad}: idempotency_window: must be positive" in lines
    assert any(line.startswith(f"{broken}: line 2 column 1: ") and "invalid YAML" in line for line in lines)
    # The duplicate is only checked once every file parses; fix the others and it is reported.
    bad.unlink()
    broken.unlink()
    with pytest.raises(SpecError) as duplicate:
        load_stream_specs(folder)
    assert str(duplicate.value) == f"{second}: name: stream 'orders' is already declared in {first}"


def test_sync_and_upsert_through_python(store_url: str, tmp_path: Path):
    folder = tmp_path / "streams"
    write(folder, "clicks.yaml", "name: clicks\ndescription: page clicks\nretention: {max_age: 7d}\n")
    registry = StreamRegistry(get_engine(store_url))
    [synced] = registry.sync_declared(folder)
    assert (synced.name, synced.origin, synced.max_age_s, synced.max_count) == (
        "clicks",
        "yaml:clicks.yaml",
        604800,
        None,
    )

    created = registry.upsert(
        StreamSpec(name="payments", payload_schema={"type": "object"}, retention={"max_count": 5})
    )
    assert created.origin == "api" and created.max_count == 5
    assert [d.name for d in registry.list()] == ["clicks", "payments"]

    updated = registry.upsert(StreamSpec(name="payments", description="money", retention={"max_count": 9}))
    assert updated.created_at == created.created_at and updated.updated_at >= created.updated_at
    assert registry.get("payments").max_count == 9 and registry.get("payments").payload_schema is None
    assert registry.get("payments:dead-letter").max_count == 9
    with pytest.raises(StreamNotFound):
        registry.get("nothing")


def test_a_declaration_rejects_reserved_names():
    with pytest.raises(ValueError, match="lowercase letters"):
        StreamSpec(name="orders:dead-letter")


def test_a_payload_schema_never_makes_the_platform_fetch_a_url():
    """A remote `$ref` is refused at declaration (nothing listens on port 9: a fetch would also fail,
    but with a connection error, not this message); references inside the schema still resolve."""
    with pytest.raises(ValueError, match="not a valid JSON Schema: .*Retrieval is disabled"):
        StreamSpec(name="orders", payload_schema={"$ref": "http://127.0.0.1:9/order.json"})
    local = {"definitions": {"id": {"type": "integer"}}, "properties": {"id": {"$ref": "#/definitions/id"}}}
    StreamSpec(name="orders", payload_schema=local)
    validator = compile_schema(local)
    assert validator.is_valid({"id": 1}) and not validator.is_valid({"id": "one"})


# --- ownership: each stream has one owner, `api` or `yaml:<file>`, and only its owner changes it ------


def test_a_yaml_stream_is_owned_by_its_file_and_follows_it(store_url: str, tmp_path: Path):
    folder = tmp_path / "streams"
    first = write(folder, "clicks.yaml", "name: clicks\nretention: {max_count: 5}\n")
    registry = StreamRegistry(get_engine(store_url))
    assert [d.origin for d in registry.sync_declared(folder)] == ["yaml:clicks.yaml"]

    first.rename(folder / "web-clicks.yaml")  # the same stream, moved to another file
    (folder / "web-clicks.yaml").write_text("name: clicks\nretention: {max_count: 7}\n")
    [moved] = registry.sync_declared(folder)
    assert (moved.origin, moved.max_count) == ("yaml:web-clicks.yaml", 7)

    # The API (or Python) cannot change it: the error names the file to edit; nothing changes.
    with pytest.raises(StreamOwnedElsewhere) as refused:
        registry.upsert(StreamSpec(name="clicks", retention={"max_count": 1}))
    assert refused.value.file == "web-clicks.yaml"
    assert str(refused.value) == (
        "stream 'clicks' is declared in the streams folder's file web-clicks.yaml; change it there "
        "(applied when the platform starts)"
    )
    assert registry.get("clicks").max_count == 7 and registry.get("clicks").origin == "yaml:web-clicks.yaml"

    # A file removed: the stream keeps its declaration and its owner.
    (folder / "web-clicks.yaml").unlink()
    assert registry.sync_declared(folder) == []
    assert registry.get("clicks").origin == "yaml:web-clicks.yaml"


def test_the_sync_never_overwrites_a_stream_the_api_owns(store_url: str, tmp_path: Path):
    registry = StreamRegistry(get_engine(store_url))
    api = registry.upsert(StreamSpec(name="payments", retention={"max_count": 9}), origin="api")
    folder = tmp_path / "streams"
    clash = write(folder, "payments.yaml", "name: payments\nretention: {max_count: 1}\n")
    write(folder, "refunds.yaml", "name: refunds\n")

    with pytest.raises(SpecError) as caught:
        registry.sync_declared(folder)
    assert str(caught.value) == (
        f"{clash}: name: stream 'payments' is declared through the API (PUT /gateway/v1/streams/payments), "
        "which owns it; rename the stream in the file, remove the file, or hand the stream over to the "
        "file with `junction events transfer payments --to yaml`"
    )
    # Nothing was written: the API's stream as it was, the other file's stream not created either.
    assert registry.get("payments") == api
    assert [d.name for d in registry.list()] == ["payments"]

    clash.unlink()
    assert [d.origin for d in registry.sync_declared(folder)] == ["yaml:refunds.yaml"]
    # The API may still change its own stream.
    assert registry.upsert(StreamSpec(name="payments", retention={"max_count": 3})).max_count == 3


def test_streams_synced_before_files_were_recorded_are_claimed_by_their_file(store_url: str, tmp_path: Path):
    from sqlalchemy import text

    registry = StreamRegistry(get_engine(store_url))
    folder = tmp_path / "streams"
    write(folder, "clicks.yaml", "name: clicks\n")
    registry.sync_declared(folder)
    with registry.engine.begin() as connection:  # what revisions before 0006 wrote
        connection.execute(text("UPDATE event_streams SET origin = 'yaml' WHERE name = 'clicks'"))
    write(folder, "clicks.yaml", "name: clicks\ndescription: now with its file\n")
    [claimed] = registry.sync_declared(folder)
    assert (claimed.origin, claimed.description) == ("yaml:clicks.yaml", "now with its file")
