# The two README commands are `make demo` and `make test`; each creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stagewatch-installed

.PHONY: demo test lint typecheck pytest postgres bench fmt clean

# torch is pinned first: 2.13.0 is the CPU build (a plain `torch` requirement could pull a multi-GB CUDA one).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev,train,tensorboard]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/stagewatch demo

test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP) postgres
	$(BIN)/pytest

postgres:
	./.ci/ensure-postgres

bench: $(STAMP) postgres
	$(BIN)/python -m benchmarks.run_all

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
