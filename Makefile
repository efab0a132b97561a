# `make run` and `make test` work first on a fresh clone: both create .venv when it is missing.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
DAG := train_image_classifier

# Embedded defaults: Airflow on SQLite and MLflow on SQLite, both git-ignored inside the repo.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PIPELINE_ROOT := $(CURDIR)
export AIRFLOW_HOME ?= $(CURDIR)/.airflow
export AIRFLOW__CORE__DAGS_FOLDER ?= $(CURDIR)/dags
export AIRFLOW__CORE__LOAD_EXAMPLES ?= False
export GX_ANALYTICS_ENABLED ?= false
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/.mlflow/mlflow.db

.PHONY: setup run test test-fast lint repro bench bench-scale mlflow-ui up down browser clean

setup: $(STAMP)

# The lock pins every package, so a fresh clone installs exactly what was tested.
$(STAMP): pyproject.toml requirements.lock
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade "pip>=24"
	$(VENV)/bin/pip install -q -c requirements.lock -e ".[dev]"
	@touch $@

$(AIRFLOW_HOME)/airflow.db: $(STAMP) scripts/airflow-init.sh
	@mkdir -p $(AIRFLOW_HOME)
	scripts/airflow-init.sh > $(AIRFLOW_HOME)/db-migrate.log 2>&1

run: $(STAMP) $(AIRFLOW_HOME)/airflow.db
	pipeline data pull
	@echo "== airflow dags test $(DAG) (full log: $(AIRFLOW_HOME)/last-run.log)"
	airflow dags test $(DAG) 2>&1 | tee $(AIRFLOW_HOME)/last-run.log \
	  | grep --line-buffered -E "DAG TEST\] (starting|end) task|^epoch|validation (passed|FAILED)|ERROR|Exception" \
	  | sed -E 's/^.*\[DAG TEST\] //; s/ \[airflow.*$$//'
	@grep -q "state=success" $(AIRFLOW_HOME)/last-run.log || { echo "DAG run failed; see $(AIRFLOW_HOME)/last-run.log"; exit 1; }
	pipeline summary

# Everything, four workers on the two cores (with two, a third of the cores' time went idle while
# e2e tests waited on servers and schedulers); `--dist worksteal` with the long tests dealt out
# first (conftest.py) keeps the workers busy to the end. The 15 slowest show where time goes.
test: $(STAMP) browser
	pytest -n 4 --dist worksteal --durations=15

# The inner loop: unit, data, model and DAG-integrity tests; no live servers, no DAG runs.
test-fast: $(STAMP)
	pytest -n 2 --dist loadfile -m "not slow and not integration"

lint: $(STAMP)
	ruff check . && ruff format --check .

repro: $(STAMP)
	dvc repro

# CPU set, a few minutes: writes bench/results.json and the engine table in BENCHMARKS.md.
bench: $(STAMP)
	python bench/overhead.py
	python bench/serving.py > /dev/null
	python bench/engine.py > /dev/null

# Data at size (about 40 minutes on 2 cores; 3 GB of generated photos in bench/out): photo folders
# of 2,000 / 20,000 / 100,000 images plus full-size MNIST and CIFAR-10 through every stage; wall
# time, img/s and peak RSS per stage into BENCHMARKS.md.
bench-scale: $(STAMP)
	python bench/scale.py

# Airflow (UI, scheduler, dag-processor, triggerer) and an MLflow server in the background;
# logs and pids in .run/. `make up` twice is harmless; `make down` stops what `make up` started.
up: $(STAMP) $(AIRFLOW_HOME)/airflow.db
	pipeline data pull > /dev/null
	bash scripts/services.sh up

down:
	bash scripts/services.sh down

# Debian's Chromium for the UI test (tests/e2e/test_services.py); Playwright drives it, so no
# browser is downloaded. `make test` calls this first.
browser:
	@command -v chromium > /dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -qq --no-install-recommends chromium > /dev/null \
	  || { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends chromium > /dev/null; }; }
	@chromium --version 2> /dev/null

mlflow-ui: $(STAMP)
	mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI) --port 5000

clean:
	rm -rf .airflow .mlflow outputs
