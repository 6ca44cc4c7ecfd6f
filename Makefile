# Two commands set up a fresh machine: `make demo` and `make test`.
# Each creates or refreshes the local virtual environment (.venv) and installs the project.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export DBT_SEND_ANONYMOUS_USAGE_STATS := false
export GX_ANALYTICS_ENABLED := false
export DAGSTER_DISABLE_TELEMETRY := true

.PHONY: install demo test test-slow bench clean dev

install: $(STAMP)

# Re-installs when the dependency list or the pins change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch on disk; an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/eocausal demo --workdir demo_run

test: $(STAMP)
	$(PY) -m pytest

# Long suites (Monte Carlo, fault matrix): run deliberately.
test-slow: $(STAMP)
	$(PY) -m pytest -m slow

# The UI binds to loopback only.
dev: $(STAMP)
	mkdir -p .dagster_home && cp dagster.yaml .dagster_home/dagster.yaml
	DAGSTER_HOME=$(CURDIR)/.dagster_home $(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1

bench: $(STAMP)
	$(PY) benchmarks/embeddings.py

clean:
	rm -rf demo_run dbt_project/target dbt_project/logs .pytest_cache
