# Fashion-MNIST softmax regression pipeline. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# `make setup PYTHON_VERSION=3.13` builds the venv with that interpreter, found on PATH (uv never
# downloads one); VENV=.venv-3.13 keeps it beside the default one (then pass VENV= to every target).
VENV ?= .venv
PYTHON_VERSION ?=
BIN := $(abspath $(VENV))/bin
# uv from PATH; otherwise a private copy in .tools/ (a venv, so it also works where the system
# Python refuses `pip install`, PEP 668).
UV := $(shell command -v uv 2>/dev/null || echo .tools/uv/bin/uv)
PYTHON := $(BIN)/python
PORT ?= 5001
UI_PORT ?= 5000
EVERY ?= weekly
TRIALS ?= 12
WORKERS ?= 2
RETRAIN_ARGS ?=
PYTEST_ARGS ?=  # e.g. --randomly-seed=N (the order of a past run), -p no:randomly, --durations=25
TEAM_ARGS ?=  # e.g. --state DIR --base-port N --host 0.0.0.0 (fixed by the first team-up)

# Stage commands call `python`, `dvc` and `mlflow`: take them from the project's virtualenv.
export PATH := $(BIN):$(PATH)
export UV_COMPILE_BYTECODE := 1
export UV_PROJECT_ENVIRONMENT := $(abspath $(VENV))
export UV_PYTHON_DOWNLOADS ?= never
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1

.PHONY: help setup params data train plots plots-diff exps samples test test-fast lint bench \
	bench-loop ui runs serve predict retrain schedule unschedule schedule-systemd add-data clean \
	tune bench-tune push pull team-up team-down team-status team-user team-user-remove \
	champion-history rollback

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-16s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

STAMP := $(VENV)/.installed$(if $(PYTHON_VERSION),-$(PYTHON_VERSION))

$(STAMP): pyproject.toml uv.lock
	@command -v $(UV) >/dev/null 2>&1 || { python3 -m venv .tools/uv \
		&& .tools/uv/bin/pip install --quiet uv; }
	$(UV) sync --frozen $(if $(PYTHON_VERSION),--python $(PYTHON_VERSION))
	@touch $@

# data/extra is DVC-tracked (data.dvc) and usually empty: DVC warns about an empty folder at every
# stage that depends on it. This note keeps it non-empty; .dvcignore keeps it out of DVC's hashes.
EXTRA_NOTE := data/extra/README.md
EXTRA_NOTE_LINES := 'Labelled images added by `make add-data DIR=...`, one folder per class.' \
	'DVC tracks this folder (data.dvc); this note is written by `make setup`, ignored by DVC.'

setup: $(STAMP) ## Create .venv from the lock file (PYTHON_VERSION=3.13, VENV=.venv-3.13)
	@mkdir -p data/extra
	@test -e $(EXTRA_NOTE) || printf '%s\n' $(EXTRA_NOTE_LINES) > $(EXTRA_NOTE)

params: setup ## Compose conf/ into params.yaml (what `dvc exp run` does)
	$(PYTHON) -m pipeline.commands.params

data: setup ## Download, verify and split Fashion-MNIST (DVC stages download + split)
	dvc repro split

train: params ## Run the whole pipeline (download, split, train, evaluate, register) and summarise
	@$(PYTHON) -m pipeline.commands.preflight >/dev/null
	dvc repro --force-downstream
	@$(PYTHON) -m pipeline.commands.summary --reproduce

# Options built in variables (a `\` inside a variable joins lines): make echoes one clean command.
TUNE_OPTIONS = --trials $(TRIALS) --workers $(WORKERS) $(if $(TIMEOUT),--timeout $(TIMEOUT)) \
	$(if $(STUDY),--study "$(STUDY)") $(if $(SEED),--seed $(SEED)) $(ARGS)
SERVE_OPTIONS = --port $(PORT) $(if $(MODEL),--model "$(MODEL)") \
	$(if $(MAX_BODY_MB),--max-body-mb $(MAX_BODY_MB))

tune: data ## Optuna search: TRIALS=12 WORKERS=2 [TIMEOUT=s STUDY=name SEED=n ARGS="overrides"]
	$(PYTHON) -m pipeline.tune $(strip $(TUNE_OPTIONS))

plots: setup ## Render DVC's plots to dvc_plots/show/index.html, offline (Vega via npm into .tools/)
	@$(PYTHON) -m pipeline.commands.plots show

plots-diff: setup ## Compare plots with REVS="HEAD~1 exp-name" (default HEAD) in dvc_plots/diff/
	@$(PYTHON) -m pipeline.commands.plots diff $(REVS)

exps: setup ## DVC experiments in 120 columns: model, val/test accuracy, time, MLflow run (ARGS=-A)
	@$(PYTHON) -m pipeline.commands.exps $(ARGS)

samples: data ## Write one official test image per class to samples/ (for `make predict`)
	@$(PYTHON) -m pipeline.commands.samples

ui: setup ## Open the MLflow UI of the project's store on 127.0.0.1:5000 (UI_PORT=...)
	$(PYTHON) -m pipeline.commands.ui --port $(UI_PORT)

runs: setup ## Table of the recent training runs: accuracy, version, champion (LIMIT=15)
	@$(PYTHON) -m pipeline.commands.runs $(if $(LIMIT),--limit $(LIMIT))

serve: setup ## Serve the champion over HTTP on 127.0.0.1:5001 (PORT=, MODEL=models:/..., MAX_BODY_MB=16)
	$(PYTHON) -m pipeline.commands.serve $(strip $(SERVE_OPTIONS))

predict: setup ## Classify images: make predict INPUT="a.png t10k-images-idx3-ubyte.gz" ARGS="--top-k 3"
	@test -n "$(INPUT)" || { echo 'usage: make predict INPUT="file.png ..." [ARGS=--json]' >&2; exit 2; }
	$(PYTHON) -m pipeline.commands.predict $(INPUT) $(if $(MODEL),--model "$(MODEL)") $(ARGS)

champion-history: setup ## Print every move of the alias champion (the ledger; ARGS=--json)
	@$(PYTHON) -m pipeline.commands.champion_history $(ARGS)

rollback: setup ## Move champion back to the previous champion, or VERSION=N [REASON="..."]
	@$(PYTHON) -m pipeline.commands.rollback $(if $(VERSION),--version "$(VERSION)") \
		$(if $(REASON),--reason "$(REASON)")

retrain: setup ## One retraining cycle (RETRAIN_ARGS=--no-wait skips if one is running)
	$(PYTHON) -m pipeline.commands.retrain $(RETRAIN_ARGS)

schedule: setup ## Install a cron entry that retrains at EVERY=weekly|daily|hourly|"cron expr"
	$(PYTHON) -m pipeline.commands.schedule install --every "$(EVERY)"

unschedule: setup ## Remove the cron entry
	$(PYTHON) -m pipeline.commands.schedule uninstall

schedule-systemd: setup ## Install a systemd user timer instead of cron
	$(PYTHON) -m pipeline.commands.schedule install-systemd --every "$(EVERY)"

add-data: setup ## Add labelled PNGs from DIR=path/<class>/*.png to data/extra (DVC-tracked)
	@test -n "$(DIR)" || { echo "usage: make add-data DIR=path/to/folder" >&2; exit 2; }
	$(PYTHON) -m pipeline.commands.add_data "$(DIR)"

test: setup ## Run the whole test suite in a random order (PYTEST_ARGS="--randomly-seed=N ...")
	$(PYTHON) -m pytest $(PYTEST_ARGS)

test-fast: setup ## Run core, support and the stage units, without the slow end-to-end tests
	$(PYTHON) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: setup ## Check style with ruff
	$(BIN)/ruff check pipeline tests benchmarks

bench: setup ## Benchmark SoftmaxRegression against scikit-learn on the real data
	$(PYTHON) benchmarks/bench_softmax.py

bench-loop: setup ## Time the loop from a parameter change to a registered model, on the real data
	$(PYTHON) benchmarks/bench_loop.py

bench-tune: data ## Benchmark make tune: trials per minute with 1 and 2 workers, on the real data
	$(PYTHON) benchmarks/bench_tune.py

push: setup ## dvc push to the remote of DVC_REMOTE_URL (team mode: `. ./team.env` first)
	$(PYTHON) -m pipeline.commands.remote push

pull: setup ## dvc pull from the remote of DVC_REMOTE_URL (team mode: `. ./team.env` first)
	$(PYTHON) -m pipeline.commands.remote pull

team-up: setup ## Start the team stack (PostgreSQL, S3, MLflow server) and write team.env
	$(PYTHON) -m pipeline.commands.team up $(TEAM_ARGS)

team-down: setup ## Stop the team stack (its data stays in .team/)
	$(PYTHON) -m pipeline.commands.team down $(TEAM_ARGS)

team-status: setup ## Say what of the team stack runs where
	$(PYTHON) -m pipeline.commands.team status $(TEAM_ARGS)

team-user: setup ## Add a team member: make team-user NAME=alice PERMISSION=READ|EDIT|MANAGE
	@test -n "$(NAME)" || { echo "usage: make team-user NAME=alice PERMISSION=READ" >&2; exit 2; }
	$(PYTHON) -m pipeline.commands.team user "$(NAME)" --permission "$(or $(PERMISSION),READ)" $(TEAM_ARGS)

team-user-remove: setup ## Remove a team member and revoke its keys: make team-user-remove NAME=alice
	@test -n "$(NAME)" || { echo "usage: make team-user-remove NAME=alice" >&2; exit 2; }
	$(PYTHON) -m pipeline.commands.team remove-user "$(NAME)" $(TEAM_ARGS)

clean: ## Remove pipeline outputs and caches (keeps .venv, the MLflow store and the DVC cache)
	rm -rf data/raw data/split models/model.skops plots/predictions_*.csv reports outputs \
		multirun dvc_plots samples .pytest_cache .ruff_cache
