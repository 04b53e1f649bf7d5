"""alerts.yaml: alert rules, their grouping timings and inhibitions, validated in the kernel's format.

```yaml
defaults:                      # Alertmanager's route: how alerts are grouped and how often notified
  group_by: [rule]             # labels; `rule` is every alert's own
  group_wait: 30s              # a new group waits this long for its first notification
  group_interval: 5m           # a changed group is notified again at most this often
  repeat_interval: 4h          # an unchanged firing group is reminded this often
rules:
  flights_quality:
    signal: {kind: quality_score, pipeline: flights}
    condition: {field: value, op: lt, value: 0.9}   # the kernel's conditions over {value, labels…}
    for: 0s                    # how long the condition must hold before the alert fires
    severity: warning          # critical | error | warning | info
    labels: {team: data}
    summary: "{{ labels.pipeline }} scored {{ value }}"
    channels: [ops]
inhibit:                       # a firing source alert mutes the targets sharing its `equal` labels
  - source: {severity: critical}
    target: {severity: warning}
    equal: [pipeline]
```
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from orchestration.kernel.conditions import Condition, parse_condition
from orchestration.kernel.spec_errors import SpecError, SpecProblem, read_yaml, validate_spec
from orchestration.kernel.times import DurationText, duration_seconds
from resources.notifications.core import Severity
from sensors.alerts.signals import SIGNALS, Signal

_RULE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")
_LABEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class Timing(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    group_by: list[str] = Field(default_factory=lambda: ["rule"])
    group_wait: DurationText = "30s"
    group_interval: DurationText = "5m"
    repeat_interval: DurationText = "4h"


class RuleSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    signal: dict[str, Any]
    condition: dict[str, Any] | None = Field(
        default=None, description="Over {value, <labels>}; default: the signal's own."
    )
    for_: DurationText = Field(default="0s", alias="for")
    severity: Severity = "warning"
    labels: dict[str, str] = Field(default_factory=dict)
    summary: str | None = None
    description: str = ""
    channels: list[str] = Field(min_length=1)
    group_by: list[str] | None = None
    group_wait: DurationText | None = None
    group_interval: DurationText | None = None
    repeat_interval: DurationText | None = None
    send_resolved: bool = True

    @field_validator("labels")
    @classmethod
    def _label_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not _LABEL_NAME.fullmatch(name) or name in ("rule", "severity", "value"):
                raise ValueError(
                    f"label {name!r}: letters, digits and '_' (rule, severity, value are set by Junction)"
                )
        return value


class InhibitSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source: dict[str, str] = Field(min_length=1)
    target: dict[str, str] = Field(min_length=1)
    equal: list[str] = Field(default_factory=list)


class AlertsFile(BaseModel):
    SPEC_SHAPE: ClassVar[str] = "an alerts file is a mapping: rules: {name: {signal: ..., channels: [...]}}"
    model_config = ConfigDict(extra="forbid")

    defaults: Timing = Timing()
    rules: dict[str, dict[str, Any]] = Field(default_factory=dict)
    inhibit: list[InhibitSpec] = Field(default_factory=list)

    @field_validator("rules")
    @classmethod
    def _names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if not _RULE_NAME.fullmatch(name):
                raise ValueError(f"rule name {name!r}: use letters, digits, '-', '_' or '.'")
        return value


@dataclass(frozen=True)
class AlertRule:
    """A validated rule, its timings resolved from the file's defaults."""

    name: str
    spec: RuleSpec
    signal: Signal
    params: BaseModel
    timing: Timing

    @cached_property
    def condition(self) -> Condition:
        return parse_condition(self.spec.condition or self.signal.default_condition(self.params))

    @property
    def for_seconds(self) -> float:
        return duration_seconds(self.spec.for_)

    @property
    def labels(self) -> dict[str, str]:
        return {"rule": self.name, "severity": self.spec.severity, **self.spec.labels}

    def interval(self, name: str) -> timedelta:
        return timedelta(seconds=duration_seconds(getattr(self.timing, name)))


@dataclass(frozen=True)
class AlertRules:
    rules: dict[str, AlertRule]
    inhibit: list[InhibitSpec]
    path: Path | None = None


def load_alert_rules(path: str | Path | None = None, channels: set[str] | None = None) -> AlertRules:
    """The rules of `path` (default: `settings.alerts_file`; a missing file declares none); every
    problem reported, a channel not in the channels file included."""
    from orchestration.kernel.templates import compile_template
    from orchestration.settings import get_settings

    if path is None:
        path = get_settings().alerts_file
    path = Path(path)
    if not path.exists():
        return AlertRules({}, [], path)
    if channels is None:
        from resources.notifications import load_channels

        channels = set(load_channels())
    declared = validate_spec(read_yaml(path) or {}, AlertsFile, path)
    rules: dict[str, AlertRule] = {}
    problems: list[SpecProblem] = []
    for name, config in declared.rules.items():
        try:
            spec = validate_spec(config, RuleSpec)
        except SpecError as exc:
            problems.extend(exc.within(("rules", name), path).problems)
            continue
        where = f"rules.{name}"
        kind = spec.signal.get("kind")
        signal = SIGNALS.get(kind) if isinstance(kind, str) else None
        if signal is None:
            known = ", ".join(sorted(SIGNALS))
            problems.append(SpecProblem(f"{where}.signal.kind", f"must be one of: {known}", str(path)))
            continue
        try:
            params = validate_spec({k: v for k, v in spec.signal.items() if k != "kind"}, signal.Params)
        except SpecError as exc:
            problems.extend(exc.within(("rules", name, "signal"), path).problems)
            continue
        if spec.condition is not None:
            try:
                parse_condition(spec.condition)
            except SpecError as exc:
                problems.extend(exc.within(("rules", name, "condition"), path).problems)
        for index, channel in enumerate(spec.channels):
            if channel not in channels:
                declared_channels = ", ".join(sorted(channels)) or "none"
                problems.append(
                    SpecProblem(
                        f"{where}.channels[{index}]",
                        f"unknown channel {channel!r} (declared: {declared_channels})",
                        str(path),
                    )
                )
        for field_name in ("summary", "description"):
            text = getattr(spec, field_name)
            if text:
                try:
                    compile_template(text)
                except SpecError as exc:
                    problems.extend(exc.within(("rules", name, field_name), path).problems)
        overrides = {
            key: getattr(spec, key)
            for key in ("group_by", "group_wait", "group_interval", "repeat_interval")
            if getattr(spec, key) is not None
        }
        timing = declared.defaults.model_copy(update=overrides)
        rules[name] = AlertRule(name, spec, signal, params, timing)
    if problems:
        raise SpecError(problems)
    return AlertRules(rules, declared.inhibit, path)
