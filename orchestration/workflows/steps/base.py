"""What every step type provides: a config model, the function that runs it, its outputs.

A step type is one small module under `steps/` that defines a `StepType`; `steps/__init__.py` keeps
the registry. Modules here import only pydantic at module level: the code location imports them to
validate specs, and the libraries a step needs at run time (httpx, jsonpath) are imported inside
`run`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from orchestration.kernel.spec_errors import SpecProblem
    from orchestration.workflows.context import StepContext

DEFAULT_OUTPUT = "result"


class StepConfig(BaseModel):
    """The `config` block of a step. Every string field is a template unless listed otherwise.

    `not_templates`: fields holding other syntaxes (conditions, expressions, JSON paths, dotted
    names); they are not rendered and their `{{` is not looked at. `condition_fields`: fields holding a
    kernel condition over the workflow context (parsed and checked at load time).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    not_templates: ClassVar[frozenset[str]] = frozenset()
    condition_fields: ClassVar[frozenset[str]] = frozenset()

    def load_problems(self) -> list[SpecProblem]:
        """Type-specific load-time problems, located relative to the config block; none by default."""
        return []

    def context_paths(self) -> dict[tuple[str | int, ...], str]:
        """Context paths (not templates) the config reads, by location: checked like template variables."""
        return {}

    def secret_env_names(self) -> list[str]:
        """Environment variables holding secrets this step reads: their values are masked in outputs."""
        return []


@dataclass(frozen=True)
class StepType:
    """A registered step type. `run(config, context)` returns the step's JSON-able output.

    A type with several `outputs` (a branch) returns an output carrying `branch`, the name of the one
    output to yield; the others are not yielded, so Dagster skips what depends on them. A type that
    `parks` may raise `ParkStep` (see `parking.py`); its workflow's steps are checkpointed.
    """

    name: str
    description: str
    config_model: type[StepConfig]
    run: Callable[[Any, StepContext], Any]
    outputs: tuple[str, ...] = (DEFAULT_OUTPUT,)
    resource_keys: frozenset[str] = frozenset()
    parks: bool = False
