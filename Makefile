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

# the pipeline, JOBS stages at a time (0: one per core, up to 8): each stage keeps params.yaml's
# `threads`, so the results are those of plain `dvc repro`, sooner. JOBS=1: plain `dvc repro`
JOBS ?= 0
repro: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pipeline repro --jobs $(JOBS)

# Two test processes, one file each at a time (module fixtures stay in one process); one torch
# thread each, so the two share the cores instead of oversubscribing them. Most of an end-to-end
# test is single-threaded (a DVC stage's start-up), which is where the second process pays.
# The longest files first (tests/conftest.py), not xdist's most-tests-first order.
TEST_WORKERS ?= 2
test: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} \
		$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15 $(PYTEST_ARGS)

ui: setup
	$(PY) -m pipeline ui

bench: setup
	$(PY) benchmarks/run_all.py

clean:
	rm -rf data models runs checkpoints reports metrics mlflow.db mlruns mlartifacts
