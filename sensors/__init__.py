"""Dagster sensors; stream declarations live in `streams/`."""
