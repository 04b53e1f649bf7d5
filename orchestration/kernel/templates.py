"""`{{ field }}` templates for specs and messages: Jinja2, sandboxed, strict about undefined names, time-limited.

Templates are written by spec authors and rendered with run data (workflow inputs, step outputs,
alert details), so rendering must never reach Python internals, mutate the data it is given, hang a
worker, or silently print an empty string for a misspelt variable.

Time limit. Jinja compiles a template to a Python generator that runs in the caller's thread, and a
thread cannot be interrupted from outside; SIGALRM would only work on the main thread, and Dagster
runs ops, sensors and the gateway in worker threads. So the template checks a deadline itself, at
every point where it can spend unbounded time:

- every call, attribute lookup and subscript (the sandbox's `call` / `getattr` / `getitem` hooks);
- every iteration of every `{% for %}` loop: the code generator wraps each loop's iterable in
  `environment.deadline_checked(...)`, so loops whose body does nothing else are bounded too;
- every piece of output the template yields;
- `*` and `**` are intercepted so that `'x' * 10**12` or `9 ** 9 ** 9` is refused before it runs
  (and is not constant-folded at compile time either: Jinja skips folding of intercepted operators).

What this cannot bound: the duration of a single builtin operation (one huge `str.replace`, a filter
sorting a million items), which runs to completion before the next checkpoint. Inputs are data the
platform already holds in memory, so such an operation is bounded by the data's size. Output is
capped (`max_output_chars`) so a runaway loop cannot exhaust memory before the deadline strikes.
"""

from __future__ import annotations

import json
import keyword
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import date, datetime
from functools import lru_cache, partial
from typing import Any

from jinja2 import StrictUndefined, Template, TemplateSyntaxError, UndefinedError, meta, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import missing

from orchestration.errors import JunctionError
from orchestration.kernel.spec_errors import SpecError, format_location

__all__ = [
    "DEFAULT_MAX_OUTPUT_CHARS",
    "DEFAULT_TIME_LIMIT_S",
    "TemplateRenderError",
    "compile_template",
    "is_template",
    "referenced_variables",
    "render",
    "render_data",
    "render_html",
]

DEFAULT_TIME_LIMIT_S = 2.0
DEFAULT_MAX_OUTPUT_CHARS = 5_000_000
# `2 ** 4096` is a 1234-digit number: more than any message needs, still instant to compute.
_MAX_POWER_RESULT_BITS = 4096

# The deadline (time.monotonic() value) and output budget of the render running in this thread or
# task; None outside `render`, so a template rendered directly by Jinja is simply not time-limited.
_deadline: ContextVar[float | None] = ContextVar("junction_template_deadline", default=None)
_time_limit: ContextVar[float] = ContextVar("junction_template_time_limit", default=DEFAULT_TIME_LIMIT_S)


class TemplateRenderError(JunctionError):
    """A template could not be rendered: a variable is missing, a limit was hit, the sandbox refused."""

    def __init__(self, reason: str, *, variable: str | None = None, location: str | None = None):
        self.reason = reason
        self.variable = variable
        self.location = location
        super().__init__(f"{location}: {reason}" if location else reason)

    def at(self, location: str) -> TemplateRenderError:
        """The same error, anchored at `location` (a field of the data being rendered)."""
        return TemplateRenderError(self.reason, variable=self.variable, location=location)


def _check_deadline() -> None:
    deadline = _deadline.get()
    if deadline is not None and time.monotonic() > deadline:
        raise TemplateRenderError(f"rendering exceeded the time limit of {_time_limit.get():g} s")


class _MissingVariable(UndefinedError):
    """Jinja's undefined error, keeping the object and name that were looked up so the full path of
    the missing variable can be reported (Jinja itself only says "'dict object' has no attribute")."""

    def __init__(self, message: str, *, owner: Any, name: Any):
        super().__init__(message)
        self.owner = owner
        self.name = name


class _StrictUndefined(StrictUndefined):
    """StrictUndefined whose error remembers where the lookup failed (see `_MissingVariable`)."""

    __slots__ = ()

    def __init__(
        self, hint: str | None = None, obj: Any = missing, name: Any = None, exc: Any = UndefinedError
    ):
        # The sandbox passes exc=SecurityError for unsafe attributes: that one is kept as it is.
        if exc is UndefinedError:
            exc = partial(_MissingVariable, owner=obj, name=name)
        super().__init__(hint, obj, name, exc)


class _DeadlineCodeGenerator(CodeGenerator):
    """Compiles `{% for x in items %}` as `for x in environment.deadline_checked(items)`."""

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        # The wrapper is a sandboxed call of an environment method; the loop's own variables, `else`
        # branch, filters (`if`) and `loop` object are compiled by Jinja exactly as before.
        if not getattr(node, "_deadline_checked", False):
            node.iter = nodes.Call(
                nodes.EnvironmentAttribute("deadline_checked", lineno=node.lineno),
                [node.iter],
                [],
                None,
                None,
                lineno=node.lineno,
            )
            node._deadline_checked = True  # type: ignore[attr-defined]
        super().visit_For(node, frame)


class _JunctionEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox (no `_private` or internal attributes, no mutation of lists/dicts/sets: rendering
    must not change the run data it reads) plus the deadline checks described in the module doc."""

    code_generator_class = _DeadlineCodeGenerator
    intercepted_binops = frozenset({"*", "**"})

    def __init__(self, *, autoescape: bool):
        super().__init__(
            autoescape=autoescape,
            undefined=_StrictUndefined,
            keep_trailing_newline=True,
            auto_reload=False,
        )
        self.filters["datetimeformat"] = datetimeformat
        if not autoescape:
            # Jinja's `tojson` escapes <, >, & and ' for embedding in HTML; in plain text (JSON
            # bodies, messages) those escapes would only corrupt the output.
            self.filters["tojson"] = _tojson_text

    def deadline_checked(self, iterable: Iterable[Any]) -> Iterator[Any]:
        for item in iterable:
            _check_deadline()
            yield item

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - Jinja's own signature
        _check_deadline()
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _check_deadline()
        # Data first: `{{ inputs.items }}` is the input named "items" when there is one, not the
        # dict method that Jinja's attribute-first lookup would return.
        if isinstance(obj, Mapping) and attribute in obj:
            return obj[attribute]
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _check_deadline()
        return super().getitem(obj, argument)

    def call_binop(self, context: Any, operator_name: str, left: Any, right: Any) -> Any:
        _check_deadline()
        if operator_name == "*":
            _refuse_huge_repetition(left, right)
            _refuse_huge_repetition(right, left)
        elif operator_name == "**" and isinstance(left, int) and isinstance(right, int):
            if abs(left) > 1 and right > 0 and abs(left).bit_length() * right > _MAX_POWER_RESULT_BITS:
                raise SecurityError(f"{left} ** {right} is too large")
        return super().call_binop(context, operator_name, left, right)


def _refuse_huge_repetition(sequence: Any, times: Any) -> None:
    if isinstance(sequence, str | list | tuple) and isinstance(times, int):
        if len(sequence) * times > DEFAULT_MAX_OUTPUT_CHARS:
            raise SecurityError(f"repeating a sequence of {len(sequence)} items {times} times is too large")


def _tojson_text(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=False, default=str)


def datetimeformat(value: Any, format: str = "%Y-%m-%d %H:%M:%S") -> str:  # noqa: A002 - filter argument name
    """`{{ run.started_at | datetimeformat('%d %b %Y') }}`: datetimes, dates, ISO 8601 strings, epoch seconds."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        value = datetime.fromtimestamp(value).astimezone()
    if not isinstance(value, date):
        raise TypeError(
            f"datetimeformat expects a date, datetime, ISO string or epoch seconds, not {value!r}"
        )
    return value.strftime(format)


_environments = {False: _JunctionEnvironment(autoescape=False), True: _JunctionEnvironment(autoescape=True)}


def is_template(text: str) -> bool:
    """Whether `text` contains template syntax at all (plain strings need not be compiled)."""
    return "{{" in text or "{%" in text or "{#" in text


@lru_cache(maxsize=1024)
def compile_template(text: str, *, autoescape: bool = False) -> Template:
    """The compiled template (cached); a syntax error raises `SpecError` naming the line."""
    try:
        return _environments[autoescape].from_string(text)
    except TemplateSyntaxError as exc:
        raise SpecError.at((), f"template syntax error at line {exc.lineno}: {exc.message}") from None


def render(
    template_or_text: Template | str,
    context: Mapping[str, Any],
    *,
    time_limit_s: float = DEFAULT_TIME_LIMIT_S,
    autoescape: bool = False,
    max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS,
) -> str:
    """Render with `context`; `TemplateRenderError` names the missing variable or the limit hit.

    Text without template syntax is returned as it is; in a template, Jinja's lexer turns every line
    break into `\n`. `autoescape` applies to text (a compiled `Template` keeps the escaping it was
    compiled with).
    """
    if isinstance(template_or_text, str) and not is_template(template_or_text):
        return template_or_text
    with _time_limited(time_limit_s):
        return _render_checked(template_or_text, context, autoescape, max_output_chars)


def render_html(
    template_or_text: Template | str,
    context: Mapping[str, Any],
    *,
    time_limit_s: float = DEFAULT_TIME_LIMIT_S,
) -> str:
    """Render an HTML message: every `{{ value }}` is HTML-escaped unless marked `| safe`."""
    return render(template_or_text, context, time_limit_s=time_limit_s, autoescape=True)


def render_data(obj: Any, context: Mapping[str, Any], *, time_limit_s: float = DEFAULT_TIME_LIMIT_S) -> Any:
    """A copy of `obj` with every string in it (in dicts, lists, tuples) rendered; keys stay as they are.

    One time limit covers the whole structure; an error names the field (`body.items[2]: ...`).
    """
    with _time_limited(time_limit_s):
        return _render_tree(obj, context, [])


def _render_tree(obj: Any, context: Mapping[str, Any], location: list[str | int]) -> Any:
    if isinstance(obj, str):
        if not is_template(obj):
            return obj
        try:
            return _render_checked(obj, context, False, DEFAULT_MAX_OUTPUT_CHARS)
        except TemplateRenderError as exc:
            raise exc.at(format_location(location)) from None
        except SpecError as exc:
            raise exc.within(location) from None
    if isinstance(obj, Mapping):
        return {key: _render_tree(value, context, [*location, str(key)]) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        rendered = [_render_tree(item, context, [*location, index]) for index, item in enumerate(obj)]
        return rendered if isinstance(obj, list) else tuple(rendered)
    return obj


@contextmanager
def _time_limited(time_limit_s: float) -> Iterator[None]:
    """Set the deadline for the renders inside; an enclosing render's earlier deadline is kept."""
    deadline = time.monotonic() + time_limit_s
    outer = _deadline.get()
    if outer is not None and outer < deadline:
        deadline, time_limit_s = outer, _time_limit.get()
    deadline_token, limit_token = _deadline.set(deadline), _time_limit.set(time_limit_s)
    try:
        yield
    finally:
        _deadline.reset(deadline_token)
        _time_limit.reset(limit_token)


def _render_checked(
    template_or_text: Template | str, context: Mapping[str, Any], autoescape: bool, max_output_chars: int
) -> str:
    if isinstance(template_or_text, str):
        template = compile_template(template_or_text, autoescape=autoescape)
    elif template_or_text.environment in _environments.values():
        template = template_or_text
    else:
        # A template of another Jinja environment would render outside the sandbox and the deadline.
        raise TypeError("render() takes text or a template from compile_template()")
    pieces: list[str] = []
    size = 0
    try:
        for piece in template.generate(context):
            _check_deadline()
            size += len(piece)
            if size > max_output_chars:
                raise TemplateRenderError(f"output exceeds {max_output_chars} characters")
            pieces.append(piece)
    except _MissingVariable as exc:
        path = _path_of_missing(context, exc.owner, exc.name)
        if path is None:
            raise TemplateRenderError(f"undefined variable: {exc.message}") from None
        raise TemplateRenderError(f"undefined variable '{path}'", variable=path) from None
    except UndefinedError as exc:
        raise TemplateRenderError(f"undefined variable: {exc.message}") from None
    except SecurityError as exc:
        raise TemplateRenderError(f"refused by the template sandbox: {exc}") from None
    except RecursionError:
        raise TemplateRenderError("recursion too deep (a macro calling itself?)") from None
    except TemplateRenderError:
        raise
    except Exception as exc:  # noqa: BLE001 - a filter or operation failed on the data: name it, no traceback
        raise TemplateRenderError(f"{type(exc).__name__}: {exc}") from None
    return "".join(pieces)


# How many objects of the context to visit when looking for the owner of a missing attribute.
_PATH_SEARCH_LIMIT = 10_000


def _path_of_missing(context: Mapping[str, Any], owner: Any, name: Any) -> str | None:
    """`inputs.amount` for `{{ inputs.amount }}`: the path of `owner` found in `context` (by identity,
    breadth first), plus `name`. A top-level name has no owner. None when the owner is not part of the
    context (a value computed inside the template)."""
    if owner is missing:
        return _format_path([name]) if name is not None else None
    if isinstance(owner, str | bytes | int | float | bool | None):
        # Equal scalars may be one shared object (small ints, interned strings): identity would not
        # tell which of them the template was reading.
        return None
    queue: deque[tuple[Any, list[Any]]] = deque((value, [key]) for key, value in context.items())
    visited = 0
    while queue and visited < _PATH_SEARCH_LIMIT:
        value, path = queue.popleft()
        visited += 1
        if value is owner:
            return _format_path([*path, name])
        if isinstance(value, Mapping):
            queue.extend((child, [*path, key]) for key, child in value.items())
        elif isinstance(value, list | tuple):
            queue.extend((child, [*path, index]) for index, child in enumerate(value))
    return None


def _format_path(parts: Iterable[Any]) -> str:
    """`["steps", "lookup", "output", "status"]` -> `steps.lookup.output.status`; `items[0]`, `x["a b"]`."""
    text = ""
    for part in parts:
        if isinstance(part, int) and not isinstance(part, bool):
            text += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and not keyword.iskeyword(part):
            text += f".{part}" if text else part
        else:
            text += f"[{json.dumps(part)}]" if isinstance(part, str) else f"[{part!r}]"
    return text


def referenced_variables(text: str) -> set[str]:
    """The context paths a template reads: `{{ steps.lookup.output.status | upper }}` ->
    `{"steps.lookup.output.status"}`. Subscripts with constant keys extend the path (`items[0]`,
    `inputs["amount"]` -> `inputs.amount`); a computed subscript ends it (`inputs[key]` -> `inputs`, and
    `key` itself is reported). Names the template defines (`set`, loop variables, macro arguments) and
    method names (`inputs.name.upper()` -> `inputs.name`) are not variables of the context.
    """
    environment = _environments[False]
    try:
        tree = environment.parse(text)
    except TemplateSyntaxError as exc:
        raise SpecError.at((), f"template syntax error at line {exc.lineno}: {exc.message}") from None
    free_names = meta.find_undeclared_variables(tree)
    paths: set[str] = set()

    def visit(node: nodes.Node) -> None:
        if isinstance(node, nodes.Call) and isinstance(node.node, nodes.Getattr):
            # A method call: the path is its object's; the method name is not a variable.
            visit(node.node.node)
            for child in node.iter_child_nodes(exclude=("node",)):
                visit(child)
            return
        if isinstance(node, nodes.Name | nodes.Getattr | nodes.Getitem):
            chain = _chain(node)
            if chain is not None:
                root, parts, dynamic_keys = chain
                if root in free_names:
                    paths.add(_format_path([root, *parts]))
                for key in dynamic_keys:
                    visit(key)
                return
        for child in node.iter_child_nodes():
            visit(child)

    visit(tree)
    return paths


def _chain(node: nodes.Node) -> tuple[str, list[Any], list[nodes.Node]] | None:
    """(root name, constant path parts, non-constant subscript expressions) of an access chain."""
    parts: list[Any] = []
    dynamic_keys: list[nodes.Node] = []
    while True:
        if isinstance(node, nodes.Name):
            return (node.name, parts[::-1], dynamic_keys) if node.ctx == "load" else None
        if isinstance(node, nodes.Getattr):
            parts.append(node.attr)
        elif isinstance(node, nodes.Getitem):
            if isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str | int):
                parts.append(node.arg.value)
            else:
                # `inputs[key].x`: only `inputs` is a known path; everything after depends on `key`.
                parts.clear()
                dynamic_keys.append(node.arg)
        else:
            return None
        node = node.node
