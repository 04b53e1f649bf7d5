# Junction's two commands: `make dev` starts the platform, `make test` runs the tests.
# Both create .venv and install the project on first use; later calls reinstall only when
# pyproject.toml changed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.junction-installed
ARGS ?=

.PHONY: help install dev test lint bench clean

help: ## List the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## Create .venv and install Junction with its test tools

dev: $(STAMP) ## Start the Dagster UI, the gateway and the daemon on http://127.0.0.1:3000 (ARGS="--port 3001")
	$(BIN)/junction dev $(ARGS)

test: $(STAMP) ## Run the whole test suite in parallel (ARGS="-k keys" to narrow it)
	$(BIN)/python -m pytest -n auto $(ARGS)

lint: $(STAMP) ## ruff check and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP) ## Run every benchmark in benchmarks/ (never part of `make test`; installs the peers, e.g. dlt)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	@for script in benchmarks/*.py; do echo "== $$script"; $(BIN)/python $$script $(ARGS) || exit 1; done

clean: ## Remove local state (.junction) and caches, keep .venv
	rm -rf .junction .pytest_cache .ruff_cache .hypothesis
