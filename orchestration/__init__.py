"""Junction: an integration platform built on Dagster.

`orchestration` holds the platform itself: settings, the platform store, the shared kernel,
the gateway, the combined server and the `junction` CLI. `definitions.py` is where the
Dagster `Definitions` are assembled.
"""

__version__ = "0.1.0"
