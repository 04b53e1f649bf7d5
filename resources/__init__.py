"""Dagster resources: sources, notification channels, cache and event stream (ConfigurableResource)."""
