# The two README commands are `make demo` and `make test`; each creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stagewatch-installed

.PHONY: demo test test-fast test-deps lint typecheck pytest postgres bench fmt clean

# torch is pinned first: 2.13.0 is the CPU build (a plain `torch` requirement could pull a multi-GB CUDA one).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev,train,tensorboard,lightning,huggingface]'
	touch $(STAMP)

# `make vision-venv`: a second environment for the resnet18 recipe. torchvision wheels are built against one exact
# torch release, so the pair is pinned and installed first (the CPU-only torch of .venv has no torchvision beside it);
# `-e '.[vision]'` then keeps that torch. About 6 GB.
VISION_VENV ?= .venv-vision
VISION_BIN := $(VISION_VENV)/bin
VISION_STAMP := $(VISION_VENV)/.stagewatch-installed

$(VISION_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VISION_VENV)
	$(VISION_BIN)/python -m pip install --quiet --upgrade pip
	$(VISION_BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(VISION_BIN)/python -m pip install --quiet -e '.[vision]'
	$(VISION_BIN)/python -c "import torch, torchvision; assert torch.__version__.split('+')[0] == '2.14.1', torch.__version__"
	touch $(VISION_STAMP)

.PHONY: vision-venv vendor-plotly
vision-venv: $(VISION_STAMP)

# `make mlflow-venv`: MLflow in an environment of its own, for benchmarks/bench_mlflow.py, which talks to it over
# HTTP only: .venv never gets mlflow or the pins it brings. Pinned, so that the comparison is against one release.
MLFLOW_VENV ?= .venv-mlflow
MLFLOW_STAMP := $(MLFLOW_VENV)/.mlflow-installed

$(MLFLOW_STAMP):
	$(PYTHON) -m venv $(MLFLOW_VENV)
	$(MLFLOW_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(MLFLOW_VENV)/bin/python -m pip install --quiet mlflow==3.17.2
	touch $(MLFLOW_STAMP)

.PHONY: mlflow-venv
mlflow-venv: $(MLFLOW_STAMP)

demo: $(STAMP)
	$(BIN)/stagewatch demo

# `make test`: everything -- system packages the tests need (PostgreSQL, Chromium; apt when it can), both
# environments, lint, types, the whole suite. `make test-fast`: lint, types and the tests not marked slow
# (under 2 minutes on two cores), for the inner loop.
test: test-deps lint typecheck vision-venv pytest

test-fast: test-deps lint typecheck
	$(BIN)/pytest -m "not slow" -q

test-deps:
	./.ci/ensure-test-deps

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

# The dashboard's plotly.js (web/__init__.py says why the basic bundle): from npm, at the version in web/__init__.py.
vendor-plotly:
	version=$$(sed -n 's/^PLOTLY_JS_VERSION = "\(.*\)".*/\1/p' web/__init__.py) && \
	tmp=$$(mktemp -d) && cd $$tmp && npm pack --silent plotly.js-basic-dist-min@$$version && tar xzf *.tgz && \
	cp package/plotly-basic.min.js $(CURDIR)/web/vendor/ && cp package/LICENSE $(CURDIR)/web/vendor/LICENSE.plotly.txt && \
	rm -rf $$tmp

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
