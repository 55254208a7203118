# Set-up and test entry points. `make test` and `make demo` build .venv from nothing when needed.
# `make demo` runs the quickstart (runs/quickstart); `make test` the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed
# pytest-xdist workers for `make test`; each test module runs whole on one worker (its fixtures are built once)
TEST_WORKERS ?= 2

.PHONY: venv test test-unit test-dist demo bench clean

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet $(TORCH_PIN)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder tests

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit

test-dist: $(STAMP)
	$(BIN)/python -m pytest tests/dist

bench: $(STAMP)
	$(BIN)/python benchmarks/loss.py

# DEMO_ARGS go to `distill quickstart`, e.g. make demo DEMO_ARGS="--smoke --out runs/smoke"
demo: $(STAMP)
	$(BIN)/distill quickstart $(DEMO_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
