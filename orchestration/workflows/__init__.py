"""Workflows: YAML specs in this folder (`*.yaml`) turned into Dagster jobs.

`spec` validates the files (pydantic models, the kernel's error format), `factory` turns each spec
into a job with one op per step, `steps` holds one module per step type and their registry, and
`context` is what a step sees at run time. Nothing here imports Dagster at module level except
`factory`, which the code location imports when it assembles the definitions.
"""
