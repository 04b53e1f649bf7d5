"""The kernel's one spec-error format: `file: field.path[2].x: reason`, every problem reported."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict

from orchestration.kernel.spec_errors import SpecError, format_location, load_spec, load_specs, validate_spec


class Step(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    type: Literal["http", "delay"]
    retries: int = 0


class Workflow(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    steps: list[Step]


@pytest.mark.parametrize(
    ("location", "text"),
    [((), "(root)"), (("steps", 2, "config", "url"), "steps[2].config.url"), ((0, "a"), "[0].a")],
)
def test_format_location(location, text):
    assert format_location(location) == text


def test_every_problem_is_reported_with_file_field_and_reason():
    data = {
        "name": "w",
        "steps": [{"id": "a", "type": "http"}, {"id": "b", "type": "mail", "retries": "x", "oops": 1}],
    }
    with pytest.raises(SpecError) as caught:
        validate_spec(data, Workflow, "orchestration/workflows/w.yaml")
    lines = str(caught.value).splitlines()
    assert "orchestration/workflows/w.yaml: steps[1].type: Input should be 'http' or 'delay'" in lines
    assert any(line.startswith("orchestration/workflows/w.yaml: steps[1].retries: ") for line in lines)
    assert "orchestration/workflows/w.yaml: steps[1].oops: unknown field" in lines
    assert len(lines) == 3


def test_sub_parser_errors_are_re_anchored():
    inner = SpecError.at(["all", 1, "op"], "unknown operator 'gtt'")
    outer = inner.within(["steps", 2, "when"], "w.yaml")
    assert str(outer) == "w.yaml: steps[2].when.all[1].op: unknown operator 'gtt'"
    assert str(SpecError.at("(root)", "empty").within("steps[0]")) == "steps[0]: empty"


def test_yaml_syntax_errors_name_line_and_column(tmp_path: Path):
    spec = tmp_path / "broken.yaml"
    spec.write_text("name: w\nsteps:\n  - id: a\n   type: http\n")
    with pytest.raises(SpecError, match=r"broken.yaml: line 4 column 4: invalid YAML"):
        load_spec(spec, Workflow)


def test_load_specs_collects_the_problems_of_all_files(tmp_path: Path):
    good = tmp_path / "good.yaml"
    good.write_text("name: g\nsteps: []\n")
    (tmp_path / "a.yaml").write_text("name: a\n")
    (tmp_path / "b.yaml").write_text("steps: []\n")
    with pytest.raises(SpecError) as caught:
        load_specs(sorted(tmp_path.glob("*.yaml")), Workflow)
    assert [(Path(p.file).name, p.location) for p in caught.value.problems] == [
        ("a.yaml", "steps"),
        ("b.yaml", "name"),
    ]
    assert load_specs([good], Workflow)[good].name == "g"


def test_unreadable_file(tmp_path: Path):
    with pytest.raises(SpecError, match=r"missing.yaml: \(file\): cannot read"):
        load_spec(tmp_path / "missing.yaml", Workflow)


def test_an_empty_or_non_mapping_document_is_told_what_a_spec_is(tmp_path):
    from resources.event_stream.registry import StreamSpec
    from resources.notifications import load_channels

    empty = tmp_path / "orders.yaml"
    empty.write_text("# declared later\n")
    with pytest.raises(SpecError) as raised:
        load_spec(empty, StreamSpec)
    assert str(raised.value) == f"{empty}: (file): empty file: a stream spec is a mapping with at least name"
    listed = tmp_path / "channels.yaml"
    listed.write_text("- ops\n")
    with pytest.raises(SpecError) as raised:
        load_channels(listed)
    assert str(raised.value).endswith(
        "channels.yaml: (root): a channels file is a mapping: channels: {name: {kind: ..., ...}}, got a list"
    )
    # An empty channels file declares no channels (a fresh project's), unlike an empty spec.
    listed.write_text("")
    assert load_channels(listed) == {}
