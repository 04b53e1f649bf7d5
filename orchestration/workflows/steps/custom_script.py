"""Custom Script: a Python function of the project (trusted code) or an external program via Dagster Pipes.

**Function** — `callable: package.module:function` (or `package.module.function`) is imported when the
step runs — not when the spec loads, so a script's heavy imports never slow the code location down. It
is called as `function(context, **arguments)` with the `StepContext` and the rendered `arguments`, and
must return a JSON-able value (checked), which becomes the step's output.

**Program** — `command: [...]` (every item a template; a first item `python` means the interpreter
running the workflow, whose environment has `dagster-pipes`) is started with `subprocess.Popen` inside
`dagster.open_pipes_session`, in its own process group, with the run's environment plus `env`, in
`cwd` (default: the project root). The step waits `timeout_s` (bounded by the step's own `timeout_s`)
and then kills the whole group — `PipesSubprocessClient.run()` cannot time out, hence the own `Popen`.
The program talks back with `dagster_pipes.open_dagster_pipes()`:

- `pipes.extras`: `arguments` (rendered), `workflow`, `step`, `execution_id`, `inputs`;
- `pipes.log.info(...)`: lines in the run's log;
- `pipes.report_custom_message({"outputs": {...}})`: merged into the step's `output.outputs`, which
  later steps read as `steps.<id>.output.outputs.<name>`;
- `pipes.report_custom_message({"metadata": {...}})`: the op's output metadata in the UI (and
  `output.metadata`); other custom messages are kept in `output.messages`;
- `pipes.report_asset_materialization(asset_key=..., metadata=...)`: an `AssetMaterialization` event
  of the op (the asset catalog shows it), its metadata in `output.materializations`.

A non-zero exit fails the step with the tail of the program's stderr (which also goes to the run's
compute logs as it is written). The example is `orchestration/workflows/scripts/summarize_orders.py`.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from orchestration.errors import JunctionError
from orchestration.kernel.imports import resolve_callable
from orchestration.workflows.context import StepContext
from orchestration.workflows.steps.base import StepConfig, StepType

DOTTED_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*([:.][A-Za-z_][A-Za-z0-9_]*)$")
PROJECT_ROOT = Path(__file__).resolve().parents[3]
# The program is killed this long before the step's own timeout, so the step reports the program's
# timeout (and the group is gone) rather than abandoning a thread that still waits for it.
STEP_TIMEOUT_MARGIN_S = 0.5
# After SIGTERM the group gets this long to exit before SIGKILL.
TERMINATE_GRACE_S = 3.0
STDERR_TAIL_LINES = 20


class CustomScriptConfig(StepConfig):
    callable: str | None = Field(
        default=None, description="package.module:function (or package.module.function)."
    )
    command: list[str] | None = Field(
        default=None,
        min_length=1,
        description="An external program talking Dagster Pipes: its argv, every item a template; "
        "`python` first means the workflow's own interpreter.",
    )
    arguments: dict[str, Any] = Field(
        default_factory=dict,
        description="Templates. A function gets them as keyword arguments, a program as "
        "pipes.extras['arguments'].",
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Program only: environment variables added to the run's (templates).",
    )
    cwd: str | None = Field(
        default=None, description="Program only: working directory (default: project root)."
    )
    timeout_s: float = Field(
        default=300, gt=0, description="Program only: killed (with its process group) after this long."
    )

    not_templates = frozenset({"callable", "timeout_s"})

    @field_validator("callable")
    @classmethod
    def _dotted(cls, value: str | None) -> str | None:
        if value is not None and (not DOTTED_PATH.match(value) or ("." not in value and ":" not in value)):
            raise ValueError("must be a dotted path to a function: package.module:function")
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> CustomScriptConfig:
        if (self.callable is None) == (self.command is None):
            raise ValueError("set either callable (a project function) or command (a Pipes program)")
        if self.callable is not None:
            program_only = [name for name in ("env", "cwd", "timeout_s") if name in self.model_fields_set]
            if program_only:
                raise ValueError(f"{', '.join(program_only)}: only for a command, not a callable")
        return self


def run_script(config: CustomScriptConfig, context: StepContext) -> Any:
    if config.command is not None:
        return run_program(config, context)
    function = resolve_callable(config.callable)
    output = function(context, **context.render(config.arguments))
    try:
        json.dumps(output)
    except (TypeError, ValueError) as exc:
        raise JunctionError(f"{config.callable} returned a value that is not JSON-able: {exc}") from None
    return output


# --- the Pipes program ------------------------------------------------------------------------------


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def run_program(config: CustomScriptConfig, context: StepContext) -> dict[str, Any]:
    import os
    import subprocess
    import time

    import dagster as dg

    if context.op_context is None:
        raise JunctionError("a command step needs the op's Dagster context (it runs only inside a run)")
    command = [str(part) for part in context.render(config.command)]
    if command[0] == "python":
        command[0] = sys.executable
    cwd = Path(str(context.render(config.cwd))) if config.cwd is not None else PROJECT_ROOT
    if not cwd.is_absolute():
        cwd = PROJECT_ROOT / cwd
    extras = {
        "arguments": context.render(config.arguments),
        "workflow": context.workflow,
        "step": context.step_id,
        "execution_id": context.execution_id,
        "inputs": _json_safe(dict(context.inputs)),
    }
    timeout = config.timeout_s
    remaining = context.remaining_s()
    if remaining is not None:
        timeout = max(min(timeout, remaining - STEP_TIMEOUT_MARGIN_S), 0.01)
    with dg.open_pipes_session(
        context=context.op_context,
        context_injector=dg.PipesTempFileContextInjector(),
        message_reader=dg.PipesTempFileMessageReader(),
        extras=extras,
    ) as session:
        started = time.monotonic()
        try:
            process = subprocess.Popen(
                command,
                cwd=cwd,
                env={**os.environ, **context.render(config.env), **session.get_bootstrap_env_vars()},
                stderr=subprocess.PIPE,
                start_new_session=True,  # its own process group: a timeout kills its children too
            )
        except OSError as exc:
            raise JunctionError(f"cannot start {command[0]!r}: {exc}") from None
        stderr = _StderrTail(process.stderr)
        try:
            exit_code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            stderr.join()
            raise JunctionError(
                f"{_shown(command)} did not finish within {timeout:g} s; its process group was killed"
                + stderr.text_suffix()
            ) from None
        finally:
            if process.poll() is None:  # interrupted (run cancelled): the program must not outlive us
                _kill_group(process)
        stderr.join()
        duration = time.monotonic() - started
    if exit_code != 0:
        raise JunctionError(f"{_shown(command)} exited with code {exit_code}" + stderr.text_suffix())
    return _collect(session, context, exit_code, duration)


def _collect(session: Any, context: StepContext, exit_code: int, duration: float) -> dict[str, Any]:
    """The step's output from what the program reported; Dagster events and metadata for the op."""
    import dagster as dg

    outputs: dict[str, Any] = {}
    metadata: dict[str, Any] = {}
    messages: list[Any] = []
    for payload in session.get_custom_messages():
        if isinstance(payload, Mapping) and set(payload) <= {"outputs", "metadata"}:
            for key, target in (("outputs", outputs), ("metadata", metadata)):
                if key in payload:
                    if not isinstance(payload[key], Mapping):
                        raise JunctionError(
                            f"the program reported {key} that is not a mapping: {payload[key]!r}"
                        )
                    target.update(payload[key])
        else:
            messages.append(payload)
    materializations = []
    for result in session.get_reported_results():
        if isinstance(result, dg.MaterializeResult):
            context.events.append(
                dg.AssetMaterialization(asset_key=result.asset_key, metadata=result.metadata or {})
            )
            materializations.append(
                {
                    "asset_key": result.asset_key.to_user_string(),
                    "metadata": _json_safe({k: v.value for k, v in (result.metadata or {}).items()}),
                }
            )
        else:
            # Asset check results need a check declared on an asset; an op step has none.
            messages.append({"unsupported_report": type(result).__name__, "detail": _json_safe(repr(result))})
            if context.log is not None:
                context.log.warning(
                    f"step {context.step_id!r}: {type(result).__name__} is kept in output.messages"
                )
    context.output_metadata.update(_json_safe(metadata))
    return {
        "exit_code": exit_code,
        "outputs": _json_safe(outputs),
        "metadata": _json_safe(metadata),
        "materializations": materializations,
        "messages": _json_safe(messages),
        "duration_s": round(duration, 3),
    }


class _StderrTail:
    """Copies the program's stderr to ours as it comes (compute logs) and keeps the last lines."""

    def __init__(self, stream: Any) -> None:
        import collections
        import threading

        self.lines: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: Any) -> None:
        with stream:
            for raw in stream:
                line = raw.decode(errors="replace")
                self.lines.append(line.rstrip("\n"))
                sys.stderr.write(line)

    def join(self) -> None:
        self._thread.join(timeout=TERMINATE_GRACE_S)

    def text_suffix(self) -> str:
        return ("; stderr (last lines):\n" + "\n".join(self.lines)) if self.lines else "; no stderr output"


def _kill_group(process: Any) -> None:
    """SIGTERM to the program's process group, SIGKILL to whatever is left after the grace."""
    import os
    import signal
    import subprocess

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(TERMINATE_GRACE_S)
        except subprocess.TimeoutExpired:
            pass


def _shown(command: list[str]) -> str:
    return " ".join(Path(command[0]).name if i == 0 else part for i, part in enumerate(command))


STEP_TYPE = StepType(
    name="custom_script",
    description="Call a project Python function, or run a program through Dagster Pipes; its result "
    "(or reported outputs and metadata) is the output.",
    config_model=CustomScriptConfig,
    run=run_script,
)
