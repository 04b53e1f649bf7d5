"""channels.yaml: each channel's block validated by the model of its kind, every problem reported."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from orchestration.kernel.spec_errors import SpecError, SpecProblem, read_yaml, validate_spec
from resources.notifications.core import CHANNEL_KINDS, NotificationChannel

_CHANNEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")


class ChannelsFile(BaseModel):
    """channels.yaml: `channels: {name: {kind: email|webhook|outbox, ...}}`.

    Each channel's block is validated by the model of its kind (below, in `load_channels`): a pydantic
    discriminated union would put the tag into error locations (`channels.ops.email.port`), and the
    kernel's error format names fields of the user's document only.
    """

    SPEC_SHAPE: ClassVar[str] = "a channels file is a mapping: channels: {name: {kind: ..., ...}}"
    model_config = ConfigDict(extra="forbid")

    channels: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("channels")
    @classmethod
    def _names(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name in value:
            if not _CHANNEL_NAME.fullmatch(name):
                raise ValueError(f"channel name {name!r}: use letters, digits, '-', '_' or '.'")
        return value


def load_channels(path: str | Path | None = None) -> dict[str, NotificationChannel]:
    """The channels declared in `path` (default: `settings.channels_file`), every problem reported."""
    if path is None:
        from orchestration.settings import get_settings

        path = get_settings().channels_file
    path = _as_shown(Path(path))
    # Unlike a spec, an empty channels file is meaningful: no channels are declared yet.
    declared = validate_spec(read_yaml(path) or {}, ChannelsFile, path)
    channels: dict[str, NotificationChannel] = {}
    problems: list[SpecProblem] = []
    for name, config in declared.channels.items():
        kind = config.get("kind")
        channel_class = CHANNEL_KINDS.get(kind) if isinstance(kind, str) else None
        if channel_class is None:
            known = ", ".join(sorted(CHANNEL_KINDS))
            reason = f"must be one of: {known}" if kind is not None else f"missing (one of: {known})"
            problems.append(SpecProblem(f"channels.{name}.kind", reason, str(path)))
            continue
        try:
            channels[name] = channel_class(name, **config)
        except SpecError as exc:
            problems.extend(exc.within(("channels", name), path).problems)
    if problems:
        raise SpecError(problems)
    return channels


def _as_shown(path: Path) -> Path:
    """Relative to the working directory when inside it: errors read `resources/channels.yaml: ...`."""
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path
