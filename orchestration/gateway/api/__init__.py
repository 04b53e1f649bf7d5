"""The platform API, version 1 (`/gateway/v1/...`): one router module per area."""
