"""The embedded gateway: a FastAPI app mounted at JUNCTION_GATEWAY_PREFIX beside the Dagster UI.

`app.create_gateway_app` builds it; the combined server (`orchestration.server`) mounts it before
the Dagster webserver, and `junction gateway` serves it alone.
"""
