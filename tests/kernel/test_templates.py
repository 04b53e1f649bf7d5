"""Templates: strict variables with their full path, the sandbox, the time limit, data rendering."""

from __future__ import annotations

import copy
import time
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from jinja2 import Template

from orchestration.kernel.spec_errors import SpecError
from orchestration.kernel.templates import (
    TemplateRenderError,
    compile_template,
    referenced_variables,
    render,
    render_data,
    render_html,
)

CONTEXT = {
    "inputs": {"amount": 42, "customer": "Ada", "items": ["apple", "pear"], "tags": {"tier": "gold"}},
    "steps": {"lookup": {"output": {"status": "found", "rows": [{"id": 7}]}}},
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hello {{ inputs.customer }}", "Hello Ada"),
        ("{{ inputs.amount * 2 }}", "84"),
        ("{{ steps.lookup.output.status | upper }}", "FOUND"),
        ("{{ steps.lookup.output.rows[0].id }}", "7"),
        ("{{ inputs['tags']['tier'] }}", "gold"),
        ("{% for item in inputs.items %}{{ loop.index }}={{ item }} {% endfor %}", "1=apple 2=pear "),
        ("{{ inputs.missing | default('none') }}", "none"),
        ("{% if inputs.missing is defined %}yes{% else %}no{% endif %}", "no"),
        ("line\n", "line\n"),
    ],
)
def test_render(text: str, expected: str) -> None:
    assert render(text, CONTEXT) == expected


def test_mapping_keys_win_over_dict_methods() -> None:
    # Jinja looks attributes up first, which would make `inputs.items` the dict method.
    assert render("{{ inputs.items | join(', ') }}", CONTEXT) == "apple, pear"
    assert render("{{ inputs.tags.items() | list }}", CONTEXT) == "[('tier', 'gold')]"


def test_tojson_is_plain_json_in_text_and_html_safe_in_html() -> None:
    context = {"data": {"note": "<b>&</b>", "n": 1}}
    assert render("{{ data | tojson }}", context) == '{"note": "<b>&</b>", "n": 1}'
    assert "\\u003cb\\u003e" in render_html("{{ data | tojson }}", context)


def test_datetimeformat_accepts_datetimes_and_iso_strings() -> None:
    moment = datetime(2024, 5, 17, 9, 30, tzinfo=UTC)
    context = {"at": moment, "iso": "2024-05-17T09:30:00+00:00"}
    assert render("{{ at | datetimeformat('%d %b %Y %H:%M') }}", context) == "17 May 2024 09:30"
    assert render("{{ iso | datetimeformat }}", context) == "2024-05-17 09:30:00"
    with pytest.raises(TemplateRenderError, match="datetimeformat expects"):
        render("{{ inputs | datetimeformat }}", CONTEXT)


def test_html_is_escaped_only_when_asked() -> None:
    context = {"name": "<script>alert(1)</script>"}
    assert render("Hi {{ name }}", context) == "Hi <script>alert(1)</script>"
    assert render_html("Hi {{ name }}", context) == "Hi &lt;script&gt;alert(1)&lt;/script&gt;"
    assert render("Hi {{ name }}", context, autoescape=True) == "Hi &lt;script&gt;alert(1)&lt;/script&gt;"


@pytest.mark.parametrize(
    ("text", "variable"),
    [
        ("{{ inputs.amount }} {{ inputs.total }}", "inputs.total"),
        ("{{ steps.lookup.output.state }}", "steps.lookup.output.state"),
        ("{{ steps.lookup.output.rows[3] }}", "steps.lookup.output.rows[3]"),
        ("{{ steps.lookup.output.rows[0].name }}", "steps.lookup.output.rows[0].name"),
        ("{{ steps.lokup.output.status }}", "steps.lokup"),
        ("{{ input.amount }}", "input"),
        ("{{ inputs['no such key'] }}", 'inputs["no such key"]'),
        (
            "{% for row in steps.lookup.output.rows %}{{ row.name }}{% endfor %}",
            "steps.lookup.output.rows[0].name",
        ),
        ("{{ inputs.total + 1 }}", "inputs.total"),
        ("{% if inputs.total > 3 %}big{% endif %}", "inputs.total"),
    ],
)
def test_missing_variable_is_named_by_its_full_path(text: str, variable: str) -> None:
    with pytest.raises(TemplateRenderError) as caught:
        render(text, CONTEXT)
    assert caught.value.variable == variable
    assert str(caught.value) == f"undefined variable '{variable}'"


def test_missing_attribute_of_a_computed_value_still_names_the_attribute() -> None:
    with pytest.raises(TemplateRenderError, match="undefined variable: .*has no attribute 'size'"):
        render("{{ (inputs.customer | upper).size }}", CONTEXT)


def test_syntax_error_is_a_spec_error_with_the_line() -> None:
    with pytest.raises(SpecError) as caught:
        compile_template("Hello\n{{ inputs.amount }\n")
    assert "template syntax error at line 2" in str(caught.value)
    anchored = caught.value.within(("steps", 1, "config", "body"), "workflows/refund.yaml")
    assert str(anchored).startswith(
        "workflows/refund.yaml: steps[1].config.body: template syntax error at line 2"
    )


def test_compiled_templates_are_cached_and_reusable() -> None:
    template = compile_template("{{ inputs.customer }}!")
    assert compile_template("{{ inputs.customer }}!") is template
    assert render(template, CONTEXT) == "Ada!"
    assert render(template, {"inputs": {"customer": "Grace"}}) == "Grace!"


def test_templates_of_other_environments_are_refused() -> None:
    with pytest.raises(TypeError, match="compile_template"):
        render(Template("{{ ''.__class__ }}"), {})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{{ steps.lookup.output.status | upper }}", {"steps.lookup.output.status"}),
        ("{{ inputs['amount'] }} {{ inputs.items[0] }}", {"inputs.amount", "inputs.items[0]"}),
        ("{{ inputs.customer.upper() }}", {"inputs.customer"}),
        (
            "{% for row in steps.lookup.output.rows %}{{ row.id }}{{ loop.index }}{% endfor %}",
            {"steps.lookup.output.rows"},
        ),
        ("{% set total = inputs.amount * 2 %}{{ total }}", {"inputs.amount"}),
        ("{{ inputs[key].name }}", {"inputs", "key"}),
        ("{% macro line(x) %}{{ x }}{% endmacro %}{{ line(inputs.amount) }}", {"inputs.amount"}),
        ("{{ range(3) | list }} plain text", set()),
        (
            "{% if alert.severity == 'high' %}{{ alert.message }}{% endif %}",
            {"alert.severity", "alert.message"},
        ),
    ],
)
def test_referenced_variables(text: str, expected: set[str]) -> None:
    assert referenced_variables(text) == expected


def test_referenced_variables_reports_syntax_errors() -> None:
    with pytest.raises(SpecError, match="template syntax error at line 1"):
        referenced_variables("{% for x in %}")


@pytest.mark.parametrize(
    "text",
    [
        # Output every iteration: stopped by the output and loop checkpoints.
        "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",
        # No output, no call, no lookup in the inner loop: only the loop checkpoint can stop it.
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        # Recursion through a macro: stopped by the call checkpoint (or the recursion limit).
        "{% macro spin(n) %}{% for i in range(1000) %}{{ spin(n) }}{% endfor %}{% endmacro %}{{ spin(1) }}",
    ],
)
def test_runaway_templates_stop_near_the_time_limit(text: str) -> None:
    started = time.monotonic()
    with pytest.raises(TemplateRenderError, match=r"time limit of 0.5 s|recursion too deep"):
        render(text, {}, time_limit_s=0.5)
    assert time.monotonic() - started < 1.5


def test_the_nested_loop_reports_a_timeout_not_another_error() -> None:
    started = time.monotonic()
    with pytest.raises(TemplateRenderError, match="exceeded the time limit of 0.3 s"):
        render(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            {},
            time_limit_s=0.3,
        )
    assert 0.3 <= time.monotonic() - started < 1.0


def test_output_is_capped() -> None:
    with pytest.raises(TemplateRenderError, match="output exceeds 1000 characters"):
        render("{% for i in range(2000) %}x{% endfor %}", {}, max_output_chars=1000)


@pytest.mark.parametrize(
    "text",
    [
        "{{ ''.__class__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ inputs.__class__.__init__.__globals__ }}",
        "{{ cycler.__init__.__globals__.os }}",
        "{{ self._TemplateReference__context }}",
        "{{ 'x'.format.__globals__ }}",
        "{{ '{0.__class__}'.format(inputs) }}",
        "{{ inputs['__class__'] }}",
        "{{ 'x' * 1000000000 }}",
        "{{ 2 ** 100000 }}",
    ],
)
def test_sandbox_escapes_are_refused(text: str) -> None:
    with pytest.raises(TemplateRenderError) as caught:
        render(text, CONTEXT)
    assert "sandbox" in str(caught.value) or "undefined variable" in str(caught.value)


@pytest.mark.parametrize(
    "text",
    [
        "{{ inputs.items.append('plum') }}",
        "{{ inputs.tags.update({'tier': 'none'}) }}",
        "{{ inputs.tags.pop('tier') }}",
        "{{ inputs.tags.clear() }}",
    ],
)
def test_templates_cannot_change_the_data_they_render(text: str) -> None:
    context = copy.deepcopy(CONTEXT)
    with pytest.raises(TemplateRenderError, match="refused by the template sandbox"):
        render(text, context)
    assert context == CONTEXT


def test_render_data_renders_every_string_and_leaves_keys_and_other_values() -> None:
    data = {
        "title": "Refund for {{ inputs.customer }}",
        "{{ inputs.customer }}": "keys are not templates",
        "amount": 42,
        "lines": ["{{ inputs.items[0] }}", {"status": "{{ steps.lookup.output.status }}"}, None, True],
        "pair": ("{{ inputs.amount }}", "plain"),
    }
    assert render_data(data, CONTEXT) == {
        "title": "Refund for Ada",
        "{{ inputs.customer }}": "keys are not templates",
        "amount": 42,
        "lines": ["apple", {"status": "found"}, None, True],
        "pair": ("42", "plain"),
    }


def test_render_data_errors_name_the_field() -> None:
    with pytest.raises(TemplateRenderError) as caught:
        render_data({"body": {"lines": ["ok", "{{ inputs.nope }}"]}}, CONTEXT)
    assert str(caught.value) == "body.lines[1]: undefined variable 'inputs.nope'"
    assert caught.value.variable == "inputs.nope"
    with pytest.raises(SpecError, match=r"^body: template syntax error at line 1"):
        render_data({"body": "{{ oops"}, CONTEXT)


def test_render_data_shares_one_time_limit() -> None:
    slow = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    started = time.monotonic()
    with pytest.raises(TemplateRenderError, match=r"^items\[0\]: rendering exceeded the time limit"):
        render_data({"items": [slow, slow, slow]}, {}, time_limit_s=0.3)
    assert time.monotonic() - started < 1.0


@given(st.text().filter(lambda text: "{" not in text))
def test_text_without_template_syntax_renders_unchanged(text: str) -> None:
    assert render(text, {}) == text
