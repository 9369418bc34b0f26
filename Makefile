# Fashion-MNIST softmax regression pipeline. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV := .venv
BIN := $(abspath $(VENV))/bin
UV := $(shell command -v uv 2>/dev/null || echo python3 -m uv)
PYTHON := $(BIN)/python
PORT ?= 5001
UI_PORT ?= 5000
EVERY ?= weekly

# Stage commands call `python`, `dvc` and `mlflow`: take them from the project's virtualenv.
export PATH := $(BIN):$(PATH)
export UV_COMPILE_BYTECODE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1

# Offline machines keep a copy of the archives in ../shared/fashion-mnist: use it as the first mirror.
ifeq ($(strip $(FMNIST_MIRROR)),)
  ifneq ($(wildcard ../shared/fashion-mnist/*.gz),)
    export FMNIST_MIRROR := $(abspath ../shared/fashion-mnist)
  endif
endif

.PHONY: help setup params data train repro test test-fast lint bench ui clean

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(VENV)/.installed: pyproject.toml uv.lock
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 \
		|| python3 -m pip install --quiet uv
	$(UV) sync --frozen
	@touch $@

setup: $(VENV)/.installed ## Create .venv from the lock file (idempotent)
	@mkdir -p data/extra

data: setup ## Download, verify and split Fashion-MNIST (DVC stages download + split)
	dvc repro split

test: setup ## Run the whole test suite (unit, integration, end-to-end)
	$(PYTHON) -m pytest

test-fast: setup ## Run the tests without the slow end-to-end ones
	$(PYTHON) -m pytest -m "not slow"

lint: setup ## Check style with ruff
	$(BIN)/ruff check pipeline tests benchmarks

bench: setup ## Benchmark SoftmaxRegression against scikit-learn on the real data
	$(PYTHON) benchmarks/bench_softmax.py

clean: ## Remove pipeline outputs and caches (keeps .venv, the MLflow store and the DVC cache)
	rm -rf data/raw data/split models metrics plots reports outputs multirun .pytest_cache .ruff_cache
