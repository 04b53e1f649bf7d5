"""Workflow specs: the shipped example loads, and every kind of mistake is reported at load time in the
kernel's format, naming file, step and field."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestration.kernel.spec_errors import SpecError
from orchestration.settings import PROJECT_ROOT
from orchestration.workflows.spec import WorkflowSpec, load_workflows, parse_workflow, workflow_files

VALID: dict[str, Any] = {
    "name": "orders",
    "inputs": {"order_id": {"type": "string"}, "amount": {"type": "number", "default": 10}},
    "steps": [
        {
            "id": "lookup",
            "type": "http_request",
            "config": {"url": "http://api/orders/{{ inputs.order_id }}"},
        },
        {
            "id": "check",
            "type": "conditional",
            "depends_on": ["lookup"],
            "config": {"condition": {"field": "steps.lookup.output.status", "op": "eq", "value": 200}},
        },
        {
            "id": "tell",
            "type": "notification",
            "depends_on": ["check.then"],
            "config": {"channel": "ops", "subject": "Order {{ inputs.order_id }}", "body": "ok"},
        },
    ],
}


def changed(path: str, value: Any) -> dict[str, Any]:
    """VALID with the value at a dotted path (list indexes as numbers) replaced."""
    spec = copy.deepcopy(VALID)
    *parents, last = [int(part) if part.isdigit() else part for part in path.split(".")]
    target = spec
    for part in parents:
        target = target[part]
    target[last] = value
    return spec


INVALID = [
    pytest.param(
        changed("steps.1.type", "teleport"),
        [
            "test.yaml: steps[1].type: unknown step type; expected one of notification, transformation, conditional, http_request, custom_script"
        ],
        id="unknown-step-type",
    ),
    pytest.param(
        changed("steps.0.config.url", "http://api/{{ inputs.customer }}"),
        [
            "test.yaml: steps[0].config.url: unknown input 'customer' in 'inputs.customer' (declared: amount, order_id)"
        ],
        id="unknown-input-in-template",
    ),
    pytest.param(
        changed("steps.2.config.body", "{{ steps.ghost.output }}"),
        ["test.yaml: steps[2].config.body: unknown step 'ghost' in 'steps.ghost.output'"],
        id="unknown-step-in-template",
    ),
    pytest.param(
        changed("steps.0.config.url", "http://api/{{ steps.tell.output.id }}"),
        [
            "test.yaml: steps[0].config.url: step 'tell' in 'steps.tell.output.id' is not upstream of this step (add it to depends_on)"
        ],
        id="template-reads-a-later-step",
    ),
    pytest.param(
        changed("steps.0.config.headers", {"X-Key": "{{ env.API_KEY }}"}),
        ["test.yaml: steps[0].config.headers.X-Key: env.API_KEY is not listed under env"],
        id="unlisted-env",
    ),
    pytest.param(
        changed("steps.0.config.url", "{{ inputs.order_id"),
        [
            "test.yaml: steps[0].config.url: template syntax error at line 1: unexpected end of template, expected 'end of print statement'."
        ],
        id="template-syntax",
    ),
    pytest.param(
        changed("steps.0.config.url", "{{ secrets.key }}"),
        [
            "test.yaml: steps[0].config.url: unknown variable 'secrets.key' (the context offers inputs, steps, execution, run, env, trigger)"
        ],
        id="unknown-namespace",
    ),
    pytest.param(
        changed("steps.2.depends_on", ["check.then", "nowhere"]),
        ["test.yaml: steps[2].depends_on[1]: unknown step 'nowhere'"],
        id="dangling-depends-on",
    ),
    pytest.param(
        changed("steps.0.depends_on", ["tell"]),
        [
            "test.yaml: steps: depends_on forms a cycle: lookup -> tell -> check -> lookup (each depends on the next)"
        ],
        id="cycle",
    ),
    pytest.param(
        changed("steps.2.depends_on", ["check"]),
        [
            "test.yaml: steps[2].depends_on[0]: 'check' is a conditional step: depend on check.then or check.otherwise"
        ],
        id="conditional-without-branch",
    ),
    pytest.param(
        changed("steps.2.depends_on", ["check.maybe"]),
        ["test.yaml: steps[2].depends_on[0]: 'check' has no output 'maybe' (it has: then, otherwise)"],
        id="unknown-branch",
    ),
    pytest.param(
        changed("steps.2.depends_on", ["check.then", "check.otherwise"]),
        [
            "test.yaml: steps[2].depends_on: names a step more than once (both branches of a conditional never run together)"
        ],
        id="both-branches",
    ),
    pytest.param(
        changed("steps.2.when", {"field": "inputs.amont", "op": "gt", "value": 5}),
        ["test.yaml: steps[2].when: unknown input 'amont' in 'inputs.amont' (declared: amount, order_id)"],
        id="when-on-unknown-input",
    ),
    pytest.param(
        changed("steps.2.when", {"field": "inputs.amount", "op": "bigger", "value": 5}),
        [
            "test.yaml: steps[2].when.op: unknown operator 'bigger'; expected one of eq, ne, gt, gte, lt, lte, in, not_in, contains, starts_with, ends_with, matches, exists, is_empty, between"
        ],
        id="when-bad-operator",
    ),
    pytest.param(
        changed("steps.1.config.condition", {"field": "steps.lookup.outptu.x", "op": "exists"}),
        ["test.yaml: steps[1].config.condition: 'steps.lookup.outptu.x': a step offers output and status"],
        id="condition-on-unknown-step-key",
    ),
    pytest.param(
        changed("steps.0.config.urll", "x"),
        ["test.yaml: steps[0].config.urll: unknown field"],
        id="unknown-config-field",
    ),
    pytest.param(
        changed("steps.0.config", {}),
        ["test.yaml: steps[0].config.url: Field required"],
        id="missing-config-field",
    ),
    pytest.param(
        changed("steps.0.config.extract", {"total": "$.[[["}),
        ["test.yaml: steps[0].config.extract.total: invalid JSONPath"],
        id="bad-jsonpath",
    ),
    pytest.param(
        changed("steps.0.config.auth", {"type": "bearer", "token_env": "sk-live-123"}),
        ["test.yaml: steps[0].config.auth.token_env: String should match pattern"],
        id="secret-instead-of-env-name",
    ),
    pytest.param(
        changed("steps.0.retry", {"max_retries": 2, "backoff": "exponential"}),
        ["test.yaml: steps[0].retry: backoff and jitter need a delay_s"],
        id="backoff-without-delay",
    ),
    pytest.param(
        changed("steps.0.id", "Look Up"),
        ["test.yaml: steps[0].id: String should match pattern '^[a-z_][a-z0-9_]*$'"],
        id="bad-step-id",
    ),
    pytest.param(
        changed("steps.2.id", "lookup"),
        ["test.yaml: steps[2].id: duplicate step id 'lookup'"],
        id="duplicate-id",
    ),
    pytest.param(
        changed("inputs.amount", {"type": "integer", "default": "ten"}),
        ["test.yaml: inputs.amount: default 'ten' is not of type integer"],
        id="default-of-wrong-type",
    ),
    pytest.param(
        changed("triggers", [{"type": "schedule", "cron": "every day"}]),
        ["test.yaml: triggers[0].cron: 'every day' is not a valid cron expression"],
        id="bad-cron",
    ),
    pytest.param(
        changed("triggers", [{"type": "schedule", "cron": "0 6 * * *"}]),
        ["test.yaml: inputs.order_id: a scheduled workflow needs a default for every input"],
        id="schedule-needs-defaults",
    ),
]


@pytest.mark.parametrize(("spec", "expected"), INVALID)
def test_invalid_specs_name_file_step_and_field(spec: dict[str, Any], expected: list[str]):
    with pytest.raises(SpecError) as raised:
        parse_workflow(spec, "test.yaml")
    lines = str(raised.value).splitlines()
    assert len(lines) == len(expected), lines
    for line, wanted in zip(lines, expected, strict=True):
        assert line.startswith(wanted), f"{line!r} does not start with {wanted!r}"


def test_transformation_expressions_and_source_are_checked():
    spec = changed(
        "steps.1",
        {
            "id": "shape",
            "type": "transformation",
            "depends_on": ["lookup"],
            "config": {
                "source": "steps.nothing.output",
                "derive": {"x": "amount +"},
                "filter": {"field": "x", "op": "near"},
            },
        },
    )
    spec["steps"][2]["depends_on"] = ["shape"]
    with pytest.raises(SpecError) as raised:
        parse_workflow(spec, "test.yaml")
    lines = str(raised.value).splitlines()
    assert "test.yaml: steps[1].config.source: unknown step 'nothing' in 'steps.nothing.output'" in lines
    assert any(
        line.startswith("test.yaml: steps[1].config.derive.x.(expression): syntax error") for line in lines
    )
    assert any(
        line.startswith("test.yaml: steps[1].config.filter.op: unknown operator 'near'") for line in lines
    )


def test_every_problem_of_every_file_at_once(tmp_path: Path):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(changed("steps.1.type", "teleport")))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(changed("steps.2.depends_on", ["nowhere"])))
    (tmp_path / "c.yaml").write_text("name: [unclosed\n")
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(VALID | {"name": "fine"}))
    with pytest.raises(SpecError) as raised:
        load_workflows(workflow_files(tmp_path))
    files = sorted({Path(problem.file).name for problem in raised.value.problems})
    assert files == ["a.yaml", "b.yaml", "c.yaml"]


def test_two_files_with_one_name_are_rejected(tmp_path: Path):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(VALID))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(VALID))
    with pytest.raises(SpecError, match="b.yaml: name: workflow 'orders' is also defined in"):
        load_workflows(workflow_files(tmp_path))


def test_the_shipped_example_loads():
    specs = load_workflows(workflow_files(PROJECT_ROOT / "orchestration" / "workflows"))
    assert "order_review" in {spec.name for spec in specs.values()}


def test_upstream_is_transitive():
    assert parse_workflow(VALID).upstream() == {
        "lookup": set(),
        "check": {"lookup"},
        "tell": {"check", "lookup"},
    }


def test_json_schema_covers_step_types_and_triggers():
    schema = WorkflowSpec.model_json_schema()
    text = str(schema)
    for name in (
        "http_request",
        "notification",
        "conditional",
        "transformation",
        "custom_script",
        "schedule",
    ):
        assert name in text
    assert schema["additionalProperties"] is False


def test_compensations_are_validated_now_and_see_their_own_step():
    undo = {
        "id": "cancel_order",
        "type": "http_request",
        "config": {"method": "DELETE", "url": "http://api/orders/{{ steps.lookup.output.body.id }}"},
    }
    spec = changed("steps.0.compensate", [undo])
    assert parse_workflow(spec).steps[0].compensate[0].id == "cancel_order"
    later = changed("steps.0.compensate", [undo | {"config": {"url": "{{ steps.tell.output }}"}}])
    with pytest.raises(SpecError) as raised:
        parse_workflow(later, "test.yaml")
    assert str(raised.value) == (
        "test.yaml: steps[0].compensate[0].config.url: step 'tell' in 'steps.tell.output' is not upstream "
        "of this step (add it to depends_on)"
    )
    clash = changed("steps.0.compensate", [undo | {"id": "check"}])
    with pytest.raises(SpecError, match=r"steps\[0\]\.compensate\[0\]\.id: duplicate step id 'check'"):
        parse_workflow(clash, "test.yaml")
    wrong_type = changed("steps.0.compensate", [undo | {"type": "rollback"}])
    with pytest.raises(SpecError, match=r"steps\[0\]\.compensate\[0\]\.type: unknown step type"):
        parse_workflow(wrong_type, "test.yaml")


def test_the_shipped_workflows_use_every_step_type():
    from orchestration.workflows.spec import STEP_TYPES

    shipped = load_workflows(workflow_files(PROJECT_ROOT / "orchestration" / "workflows"))
    used = {step.type for spec in shipped.values() for step in spec.steps}
    assert used == set(STEP_TYPES)


@pytest.mark.parametrize(("text", "reason"), [
    ("", "(file): empty file: a workflow spec is a mapping with at least name and steps"),
    ("# nothing yet\n", "(file): empty file: a workflow spec is a mapping with at least name and steps"),
    ("- id: a\n", "(root): a workflow spec is a mapping with at least name and steps, got a list"),
])  # fmt: skip
def test_an_empty_or_non_mapping_file_is_told_what_a_spec_is(tmp_path: Path, text: str, reason: str):
    path = tmp_path / "flow.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as raised:
        load_workflows([path])
    assert str(raised.value) == f"{path}: {reason}"
