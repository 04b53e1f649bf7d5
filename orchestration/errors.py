"""User-facing errors. The CLI renders a `JunctionError` as one line (no traceback) and exits non-zero."""

from __future__ import annotations


class JunctionError(Exception):
    """An error the user can act on: bad input, bad configuration, an unreachable service."""

    exit_code = 1


class ConfigurationError(JunctionError):
    """A setting, file or service the platform needs is missing, malformed or unreachable."""

    exit_code = 2
