"""Workflow specs: the pydantic models of `orchestration/workflows/*.yaml` and their load-time checks.

Structure is checked by pydantic (`extra="forbid"`; the step's `config` model is chosen by its `type`);
meaning is checked after that, every problem of every step at once, in the kernel's format
(`order.yaml: steps[2].config.url: undefined template variable 'inputs.x'`):

- `depends_on` names existing steps (a conditional's as `check.then` / `check.otherwise`), no cycles;
- every template (any string of a config except the fields a step type marks as other syntax) and
  every condition (`when`, a conditional's `condition`) reads only what exists upstream of the step:
  declared inputs, steps it depends on directly or transitively, `execution.*`, `run.id`,
  `env.NAME` for names listed under `env`, and `trigger.event` in a workflow with a stream trigger;
- step-type specifics (expressions, JSON paths, dotted names);
- a scheduled or stream-triggered workflow has a default for every input (those launch without any);
  a stream trigger's `filter` is a kernel condition over the event's payload.

`WorkflowSpec.model_json_schema()` is the JSON Schema (`junction workflows schema`).
"""

from __future__ import annotations

import graphlib
import re
from collections.abc import Iterable
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from orchestration.kernel.spec_errors import SpecError, SpecProblem, format_location, read_yaml, validate_spec
from orchestration.workflows.steps import DEFAULT_OUTPUT, STEP_TYPES, StepConfig

IDENTIFIER = r"^[a-z_][a-z0-9_]*$"
INPUT_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
    "date": (date, str),
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Model):
    type: Literal["string", "integer", "number", "boolean", "object", "array", "date"] = "string"
    description: str = ""
    default: Any = Field(default=None, description="No default: the input is required.")

    @model_validator(mode="after")
    def _default_has_the_type(self) -> InputSpec:
        allowed = INPUT_TYPES[self.type]
        value = self.default
        wrong_bool = isinstance(value, bool) and self.type in ("integer", "number")
        if value is not None and (not isinstance(value, allowed) or wrong_bool):
            raise ValueError(f"default {value!r} is not of type {self.type}")
        return self

    @property
    def required(self) -> bool:
        return self.default is None


class RetrySpec(_Model):
    """Dagster's `RetryPolicy` for the step: the whole step is run again after `delay_s`."""

    max_retries: int = Field(default=1, ge=0, le=100)
    delay_s: float | None = Field(default=None, ge=0)
    backoff: Literal["linear", "exponential"] | None = None
    jitter: Literal["full", "plus_minus"] | None = None

    @model_validator(mode="after")
    def _backoff_needs_a_delay(self) -> RetrySpec:
        if (self.backoff or self.jitter) and not self.delay_s:
            raise ValueError("backoff and jitter need a delay_s")
        return self


class ManualTrigger(_Model):
    type: Literal["manual"]


class ScheduleTrigger(_Model):
    type: Literal["schedule"]
    cron: str = Field(description="A cron expression, e.g. '0 6 * * *'.")
    timezone: str = "UTC"
    enabled: bool = Field(default=False, description="Whether the schedule starts running.")

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        # Dagster's own check: the one its ScheduleDefinition applies.
        from dagster._utils.schedules import is_valid_cron_string

        if not is_valid_cron_string(value):
            raise ValueError(f"{value!r} is not a valid cron expression")
        return value


class StreamTrigger(_Model):
    """One execution per event of `stream` matching `filter`, through the streaming sensor factory
    (`orchestration/workflows/triggers.py`); the run reads its event as `trigger.event`."""

    type: Literal["stream"]
    stream: str = Field(min_length=1, description="A stream declared in sensors/streams/.")
    filter: dict[str, Any] | None = Field(
        default=None, description="A kernel condition over the event's payload; others are skipped."
    )


class ApiTrigger(_Model):
    """Accepted now; the gateway's executions endpoint launches these."""

    type: Literal["api"]


Trigger = Annotated[ManualTrigger | ScheduleTrigger | StreamTrigger | ApiTrigger, Field(discriminator="type")]


class StepBase(_Model):
    id: str = Field(pattern=IDENTIFIER, description="Also the op's name in Dagster.")
    description: str = ""
    depends_on: list[str] = Field(
        default_factory=list,
        description="Step ids (a conditional's branch as id.then / id.otherwise). The step runs when "
        "all of them produced an output; if one was skipped, it is skipped too.",
    )
    when: dict[str, Any] | None = Field(
        default=None, description="A kernel condition over the context; false: the step does not run."
    )
    retry: RetrySpec | None = None
    timeout_s: float | None = Field(default=None, gt=0, description="Enforced by the step itself.")
    continue_on_failure: bool = False
    compensate: list[CompensationStep] = Field(
        default_factory=list, description="Run, in a later slice, if the workflow fails after this step."
    )


def _step_model(type_name: str, config_model: type[StepConfig], base: type[BaseModel]) -> type[BaseModel]:
    return create_model(
        f"{''.join(part.title() for part in type_name.split('_'))}{base.__name__.removesuffix('Base')}",
        __base__=base,
        type=(Literal[type_name], ...),
        config=(config_model, ...),
    )


class CompensationBase(_Model):
    """A compensating action: a step without edges, run in reverse order of completion (later slice)."""

    id: str = Field(pattern=IDENTIFIER)
    description: str = ""
    timeout_s: float | None = Field(default=None, gt=0)


CompensationStep = Annotated[
    Union[tuple(_step_model(name, t.config_model, CompensationBase) for name, t in STEP_TYPES.items())],  # noqa: UP007 - a Union built from the registry
    Field(discriminator="type"),
]
StepBase.model_rebuild()

Step = Annotated[
    Union[tuple(_step_model(name, t.config_model, StepBase) for name, t in STEP_TYPES.items())],  # noqa: UP007
    Field(discriminator="type"),
]


class WorkflowSpec(_Model):
    """One workflow: one file, one Dagster job."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="Junction workflow")

    name: str = Field(pattern=IDENTIFIER, description="The job's name.")
    description: str = ""
    inputs: dict[str, InputSpec] = Field(default_factory=dict)
    tags: dict[str, str] = Field(default_factory=dict, description="Dagster job tags.")
    env: list[str] = Field(
        default_factory=list, description="Environment variables templates may read as env.NAME."
    )
    triggers: list[Trigger] = Field(default_factory=lambda: [ManualTrigger(type="manual")])
    steps: list[Step] = Field(min_length=1)

    @field_validator("inputs")
    @classmethod
    def _input_names(cls, value: dict[str, InputSpec]) -> dict[str, InputSpec]:
        for name in value:
            if not re.match(IDENTIFIER, name):
                raise ValueError(f"input name {name!r} must match {IDENTIFIER}")
        return value

    @model_validator(mode="after")
    def _meaning(self) -> WorkflowSpec:
        problems = workflow_problems(self)
        if problems:
            raise SpecError(problems)
        return self

    def upstream(self) -> dict[str, set[str]]:
        """Each step's ancestors (transitively)."""
        direct = {
            step.id: {dependency.split(".")[0] for dependency in step.depends_on} for step in self.steps
        }
        order = list(graphlib.TopologicalSorter(direct).static_order())
        ancestors: dict[str, set[str]] = {}
        for step_id in order:
            ancestors[step_id] = (
                set().union(*({d} | ancestors[d] for d in direct[step_id])) if direct[step_id] else set()
            )
        return ancestors


# --- meaning ------------------------------------------------------------------------------------------

CONTEXT_ROOTS = {
    "inputs": "a declared input",
    "steps": "an upstream step",
    "execution": "id or workflow",
    "run": "id",
    "env": "a name listed under env",
    "trigger": "event, in a workflow with a stream trigger",
}
TRIGGER_EVENT_KEYS = ("stream", "id", "time", "payload")
STEP_STATE_KEYS = ("output", "status")


def _parts(path: str) -> list[str]:
    """`steps.lookup.output["a b"][0]` -> ["steps", "lookup", "output", ...] (the parts that matter)."""
    return [part for part in re.split(r"[.\[\]]", path) if part]


def reference_problem(path: str, spec: WorkflowSpec, upstream: set[str]) -> str | None:
    """Why `path` (a template variable or condition field) cannot be read here, or None."""
    parts = _parts(path)
    root, name = parts[0], parts[1] if len(parts) > 1 else None
    if root == "inputs":
        if name is None:
            return None
        if name not in spec.inputs:
            declared = ", ".join(sorted(spec.inputs)) or "none"
            return f"unknown input '{name}' in '{path}' (declared: {declared})"
        return None
    if root == "steps":
        if name is None:
            return None
        if name not in {step.id for step in spec.steps}:
            return f"unknown step '{name}' in '{path}'"
        if name not in upstream:
            return f"step '{name}' in '{path}' is not upstream of this step (add it to depends_on)"
        if len(parts) > 2 and parts[2] not in STEP_STATE_KEYS:
            return f"'{path}': a step offers {' and '.join(STEP_STATE_KEYS)}"
        return None
    if root == "execution":
        return (
            None
            if name in (None, "id", "workflow")
            else f"unknown variable '{path}' (execution.id, execution.workflow)"
        )
    if root == "run":
        return None if name in (None, "id") else f"unknown variable '{path}' (run.id)"
    if root == "env":
        if name is not None and name not in spec.env:
            return f"env.{name} is not listed under env"
        return None
    if root == "trigger":
        if not any(trigger.type == "stream" for trigger in spec.triggers):
            return f"'{path}': only a workflow with a stream trigger has trigger.event"
        if name not in (None, "event"):
            return f"unknown variable '{path}' (trigger.event)"
        if len(parts) > 2 and parts[2] not in TRIGGER_EVENT_KEYS:
            return f"'{path}': an event offers {', '.join(TRIGGER_EVENT_KEYS)}"
        return None
    roots = ", ".join(CONTEXT_ROOTS)
    return f"unknown variable '{path}' (the context offers {roots})"


def _template_strings(
    value: Any, location: tuple[str | int, ...]
) -> Iterable[tuple[tuple[str | int, ...], str]]:
    if isinstance(value, str):
        yield location, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _template_strings(item, (*location, str(key)))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _template_strings(item, (*location, index))


def _check_step(
    step: Any, location: tuple[str | int, ...], spec: WorkflowSpec, upstream: set[str]
) -> list[SpecProblem]:
    from orchestration.kernel.conditions import parse_condition, referenced_fields
    from orchestration.kernel.templates import is_template, referenced_variables

    problems: list[SpecProblem] = []

    def add(where: tuple[str | int, ...], reason: str) -> None:
        problems.append(SpecProblem(format_location((*location, *where)), reason))

    config: StepConfig = step.config
    raw = config.model_dump(mode="python", by_alias=True)
    for field_name, value in raw.items():
        if field_name in config.not_templates:
            continue
        for where, text in _template_strings(value, ("config", field_name)):
            if not is_template(text):
                continue
            try:
                variables = referenced_variables(text)
            except SpecError as exc:
                problems.extend(exc.within((*location, *where)).problems)
                continue
            for variable in sorted(variables):
                if reason := reference_problem(variable, spec, upstream):
                    add(where, reason)
    conditions = [
        (("config", name), getattr(config, name))
        for name in sorted(config.condition_fields)
        if getattr(config, name) is not None  # an optional condition left out
    ]
    if getattr(step, "when", None) is not None:
        conditions.append((("when",), step.when))
    for where, condition in conditions:
        try:
            parsed = parse_condition(condition)
        except SpecError as exc:
            problems.extend(exc.within((*location, *where)).problems)
            continue
        for field_path in sorted(referenced_fields(parsed)):
            if reason := reference_problem(field_path, spec, upstream):
                add(where, reason)
    for where, path in config.context_paths().items():
        if reason := reference_problem(path, spec, upstream):
            add(("config", *where), reason)
    problems.extend(SpecError(config.load_problems()).within((*location, "config")).problems)
    return problems


def workflow_problems(spec: WorkflowSpec) -> list[SpecProblem]:
    """Every problem of meaning in a structurally valid spec (see the module doc)."""
    problems: list[SpecProblem] = []
    steps = {step.id: step for step in spec.steps}
    seen_ids: set[str] = set()
    for index, step in enumerate(spec.steps):
        for position, compensation in enumerate(step.compensate):
            if compensation.id in steps or compensation.id in seen_ids:
                problems.append(
                    SpecProblem(
                        format_location(("steps", index, "compensate", position, "id")),
                        f"duplicate step id '{compensation.id}'",
                    )
                )
            seen_ids.add(compensation.id)
        if step.id in seen_ids:
            problems.append(
                SpecProblem(format_location(("steps", index, "id")), f"duplicate step id '{step.id}'")
            )
        seen_ids.add(step.id)
    edges_ok = len(seen_ids) == len(spec.steps) + sum(len(step.compensate) for step in spec.steps)
    for index, step in enumerate(spec.steps):
        for position, dependency in enumerate(step.depends_on):
            where = format_location(("steps", index, "depends_on", position))
            target, _, branch = dependency.partition(".")
            if target not in steps:
                problems.append(SpecProblem(where, f"unknown step '{target}'"))
                edges_ok = False
                continue
            outputs = STEP_TYPES[steps[target].type].outputs
            if branch and branch not in outputs:
                problems.append(
                    SpecProblem(where, f"'{target}' has no output '{branch}' (it has: {', '.join(outputs)})")
                )
                edges_ok = False
            elif not branch and outputs != (DEFAULT_OUTPUT,):
                options = " or ".join(f"{target}.{output}" for output in outputs)
                problems.append(
                    SpecProblem(where, f"'{target}' is a {steps[target].type} step: depend on {options}")
                )
                edges_ok = False
        targets = [dependency.partition(".")[0] for dependency in step.depends_on]
        if len(set(targets)) != len(targets):
            problems.append(
                SpecProblem(
                    format_location(("steps", index, "depends_on")),
                    "names a step more than once (both branches of a conditional never run together)",
                )
            )
            edges_ok = False
    if edges_ok:
        direct = {step.id: {d.partition(".")[0] for d in step.depends_on} for step in spec.steps}
        try:
            graphlib.TopologicalSorter(direct).prepare()
        except graphlib.CycleError as exc:
            cycle = " -> ".join(exc.args[1][::-1])
            problems.append(
                SpecProblem("steps", f"depends_on forms a cycle: {cycle} (each depends on the next)")
            )
            edges_ok = False
    if not edges_ok:
        return problems  # templates are checked against ancestors, which need a sound graph
    upstream = spec.upstream()
    for index, step in enumerate(spec.steps):
        problems.extend(_check_step(step, ("steps", index), spec, upstream[step.id]))
        for position, compensation in enumerate(step.compensate):
            # A compensation sees what its step saw, and its step's own output.
            problems.extend(
                _check_step(
                    compensation,
                    ("steps", index, "compensate", position),
                    spec,
                    upstream[step.id] | {step.id},
                )
            )
    launched_without_inputs = [t.type for t in spec.triggers if t.type in ("schedule", "stream")]
    if launched_without_inputs:
        kind = "scheduled" if launched_without_inputs[0] == "schedule" else "stream-triggered"
        for name, spec_input in spec.inputs.items():
            if spec_input.required:
                problems.append(
                    SpecProblem(f"inputs.{name}", f"a {kind} workflow needs a default for every input")
                )
    problems.extend(_trigger_filter_problems(spec))
    return problems


def _trigger_filter_problems(spec: WorkflowSpec) -> list[SpecProblem]:
    from orchestration.kernel.conditions import parse_condition

    problems: list[SpecProblem] = []
    for index, trigger in enumerate(spec.triggers):
        if trigger.type == "stream" and trigger.filter is not None:
            try:
                parse_condition(trigger.filter)
            except SpecError as exc:
                problems.extend(exc.within(("triggers", index, "filter")).problems)
    return problems


# --- loading ------------------------------------------------------------------------------------------


def _alternatives(names: Iterable[str]) -> str:
    return "|".join(map(re.escape, names))


# Where the models use a discriminated union, and the tags pydantic puts into an error's location there.
_UNION_TAGS_IN_LOCATIONS = [
    re.compile(rf"^(steps\[\d+\](?:\.compensate\[\d+\])?)\.({_alternatives(STEP_TYPES)})(?=\.|\[|$)"),
    re.compile(r"^(triggers\[\d+\])\.(manual|schedule|stream|api)(?=\.|\[|$)"),
    re.compile(r"^(steps\[\d+\](?:\.compensate\[\d+\])?\.config\.auth)\.(bearer|basic)(?=\.|$)"),
]


def _without_union_tag(problem: SpecProblem) -> SpecProblem:
    """pydantic names the chosen step type in an error's location (`steps[2].http_request.config.url`);
    the user's document has no such field, so it is taken out (`steps[2].config.url`). The same for
    triggers and HTTP auth."""
    location = problem.location
    for pattern in _UNION_TAGS_IN_LOCATIONS:
        location = pattern.sub(r"\1", location)
    reason = problem.reason
    if "does not match any of the expected tags" in reason:
        location, reason = f"{location}.type", f"unknown step type; expected one of {', '.join(STEP_TYPES)}"
    return SpecProblem(location, reason, problem.file)


def parse_workflow(data: Any, file: str | Path | None = None) -> WorkflowSpec:
    """Validate parsed YAML; `SpecError` lists every problem in the kernel's format."""
    try:
        return validate_spec(data, WorkflowSpec, file)
    except SpecError as exc:
        raise SpecError(_without_union_tag(problem) for problem in exc.problems) from None


def workflow_files(directory: str | Path) -> list[Path]:
    return sorted(Path(directory).glob("*.yaml")) + sorted(Path(directory).glob("*.yml"))


def load_workflows(paths: Iterable[str | Path]) -> dict[Path, WorkflowSpec]:
    """Load every file, reporting the problems of all of them at once; names must be unique."""
    loaded: dict[Path, WorkflowSpec] = {}
    problems: list[SpecProblem] = []
    names: dict[str, Path] = {}
    for path in paths:
        try:
            spec = parse_workflow(read_yaml(path), path)
        except SpecError as exc:
            problems.extend(exc.problems)
            continue
        if spec.name in names:
            problems.append(
                SpecProblem(
                    "name", f"workflow '{spec.name}' is also defined in {names[spec.name]}", str(path)
                )
            )
            continue
        names[spec.name] = Path(path)
        loaded[Path(path)] = spec
    if problems:
        raise SpecError(problems)
    return loaded
