"""One error format for every YAML/JSON spec loader: `path/to/file.yaml: steps[2].config.url: reason`.

Loaders collect every problem they find (not just the first) into one `SpecError`; the CLI prints
one line per problem and no traceback. Sub-parsers (conditions, expressions, templates) raise with a
location relative to their own input; the caller re-anchors it with `SpecError.within(...)`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from orchestration.errors import JunctionError

Location = Sequence[str | int]
# libyaml's parser (built into PyYAML's wheels) reads the specs ~10x faster than the pure-Python one,
# which every code location load, run worker included, paid for each spec; same safe constructor and
# resolver, same error marks. The pure-Python loader is the fallback where PyYAML was built without it.
SPEC_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
ModelT = TypeVar("ModelT", bound=BaseModel)


def format_location(location: Location) -> str:
    """`("steps", 2, "config", "url")` -> `steps[2].config.url`; the empty location is `(root)`."""
    text = ""
    for part in location:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "(root)"


def join_location(prefix: str, location: str) -> str:
    if not prefix or prefix == "(root)":
        return location
    if location == "(root)":
        return prefix
    return prefix + location if location.startswith("[") else f"{prefix}.{location}"


@dataclass(frozen=True)
class SpecProblem:
    location: str
    reason: str
    file: str | None = None

    def __str__(self) -> str:
        return (
            f"{self.file}: {self.location}: {self.reason}" if self.file else f"{self.location}: {self.reason}"
        )


class SpecError(JunctionError):
    """One or more problems in a spec, each naming file, field and reason."""

    def __init__(self, problems: Iterable[SpecProblem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))

    @classmethod
    def at(cls, location: Location | str, reason: str, file: str | Path | None = None) -> SpecError:
        where = location if isinstance(location, str) else format_location(location)
        return cls([SpecProblem(where, reason, str(file) if file is not None else None)])

    def within(self, prefix: Location | str = (), file: str | Path | None = None) -> SpecError:
        """The same problems, their locations prefixed (and the file set where it was not)."""
        prefix_text = prefix if isinstance(prefix, str) else format_location(prefix) if prefix else ""
        return SpecError(
            replace(
                problem,
                location=join_location(prefix_text, problem.location),
                file=problem.file or (str(file) if file is not None else None),
            )
            for problem in self.problems
        )


def problems_from_validation(exc: ValidationError, file: str | Path | None = None) -> list[SpecProblem]:
    problems = []
    for error in exc.errors(include_url=False):
        # pydantic adds the tag of a discriminated union / the function name of validators to loc;
        # those are not fields of the user's document.
        location = [
            part for part in error["loc"] if not (isinstance(part, str) and part.startswith("function-"))
        ]
        reason = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            reason = "unknown field"
        problems.append(
            SpecProblem(format_location(location), reason, str(file) if file is not None else None)
        )
    return problems


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file; syntax errors name the line and column."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError.at("(file)", f"cannot read: {exc}", path) from None
    try:
        return yaml.load(text, Loader=SPEC_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}" if mark else "(file)"
        reason = getattr(exc, "problem", None) or str(exc)
        raise SpecError.at(where, f"invalid YAML: {reason}", path) from None


def spec_shape(model: type[BaseModel]) -> str:
    """What a document of `model` is, for a file that is empty or not a mapping: the model's own
    `SPEC_SHAPE`, else its name and required fields (`a workflow spec is a mapping with at least name
    and steps`)."""
    shape = getattr(model, "SPEC_SHAPE", None)
    if shape:
        return shape
    noun = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", model.__name__).lower()
    required = [name for name, field in model.model_fields.items() if field.is_required()]
    at_least = f" with at least {' and '.join(required)}" if required else ""
    return f"a {noun} is a mapping{at_least}"


def validate_spec(data: Any, model: type[ModelT], file: str | Path | None = None) -> ModelT:
    """Validate parsed data against a pydantic model, raising every problem in the kernel format.

    An empty document (an empty file, or only comments) and one that is not a mapping are told what
    a spec is, not pydantic's `Input should be a valid dictionary or instance of PipelineSpec`."""
    if data is None:
        raise SpecError.at("(file)", f"empty file: {spec_shape(model)}", file)
    if not isinstance(data, dict | model):
        raise SpecError.at("(root)", f"{spec_shape(model)}, got {_yaml_kind(data)}", file)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise SpecError(problems_from_validation(exc, file)) from None
    except SpecError as exc:  # raised by a sub-parser inside a validator
        raise exc.within((), file) from None


def _yaml_kind(data: Any) -> str:
    if isinstance(data, list):
        return "a list"
    if isinstance(data, str):
        return f"the text {data[:40]!r}"
    return f"the value {data!r}"[:60]


def load_spec(path: str | Path, model: type[ModelT]) -> ModelT:
    return validate_spec(read_yaml(path), model, path)


def load_named_specs(folder: str | Path, model: type[ModelT], kind: str) -> dict[Path, ModelT]:
    """Every `*.yaml`/`*.yml` of `folder` (none when it does not exist), one declaration of `model`
    each, validated; a `name` two files declare is an error naming both (`kind`: "stream", ...)."""
    folder = Path(folder)
    paths = sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]) if folder.is_dir() else []
    specs = load_specs(paths, model)
    seen: dict[str, Path] = {}
    problems = []
    for path, spec in specs.items():
        name = spec.name
        if name in seen:
            problems.append(
                SpecProblem("name", f"{kind} {name!r} is already declared in {seen[name]}", str(path))
            )
        seen.setdefault(name, path)
    if problems:
        raise SpecError(problems)
    return specs


def load_specs(paths: Iterable[str | Path], model: type[ModelT]) -> dict[Path, ModelT]:
    """Load every file, collecting the problems of all of them before raising."""
    loaded: dict[Path, ModelT] = {}
    problems: list[SpecProblem] = []
    for path in paths:
        try:
            loaded[Path(path)] = load_spec(path, model)
        except SpecError as exc:
            problems.extend(exc.problems)
    if problems:
        raise SpecError(problems)
    return loaded
