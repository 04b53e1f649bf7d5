"""A function named in a spec (`package.module:function` or `package.module.function`), imported.

Specs name project code in one way everywhere: a transform's `python` step, a Custom Script step's
`callable`, a cache namespace's write-behind `writer` and warmer `loader`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from orchestration.errors import JunctionError


def resolve_callable(path: str, error: type[Exception] = JunctionError) -> Callable[..., Any]:
    """The callable at `path`; `error` (naming the path and why) when it cannot be imported."""
    module_name, _, attribute = path.rpartition(":") if ":" in path else path.rpartition(".")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as exc:
        raise error(f"cannot import {path}: {exc}") from None
    if not callable(function):
        raise error(f"{path} is not callable")
    return function
