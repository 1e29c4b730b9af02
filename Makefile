# Two commands for a newcomer: `make repro` (set up + run the pipeline on params.yaml) and
# `make test` (set up + run the test suite). Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# offline-friendly defaults (override by exporting your own values)
export MLFLOW_DISABLE_TELEMETRY ?= true
export DO_NOT_TRACK ?= true
export DVC_NO_ANALYTICS ?= 1

.PHONY: setup repro test ui bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

repro: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pipeline repro

test: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q $(PYTEST_ARGS)

ui: setup
	$(PY) -m pipeline ui

bench: setup
	$(PY) benchmarks/run_all.py

clean:
	rm -rf data models runs checkpoints reports metrics mlflow.db mlruns mlartifacts
