# Two commands set up a fresh machine: `make demo` and `make test`.
# Each creates or refreshes the local virtual environment (.venv) and installs the project.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export DBT_SEND_ANONYMOUS_USAGE_STATS := false
export GX_ANALYTICS_ENABLED := false
export DAGSTER_DISABLE_TELEMETRY := true

.PHONY: install demo test lint test-slow test-ops browser docs bench bench-gpu clean dev

install: $(STAMP)

# Re-installs when the dependency list or the pins change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch on disk; an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	# The fused AVX2 RCF kernel, compiled into the user's cache (a few s); without a compiler or
	# AVX2 RCF uses its torch path, so a failure here is not an error.
	-$(PY) -m eocausal.embed.rcf_cpu
	touch $(STAMP)

# The demo's runs are recorded where `make dev` looks (.dagster_home).
demo: $(STAMP)
	DAGSTER_HOME=$(CURDIR)/.dagster_home $(VENV)/bin/eocausal demo --workdir demo_run

test: $(STAMP) browser lint
	$(PY) -m pytest

# Fast, lint only (configured in pyproject.toml): ruff on the library and the Dagster layer, mypy on the library.
lint: $(STAMP)
	$(VENV)/bin/ruff check eocausal assets sensors || \
		(echo "make lint: most of these are fixed by $(VENV)/bin/ruff check --fix eocausal assets sensors"; exit 1)
	$(VENV)/bin/mypy

# Long suites (Monte Carlo, fault matrix): run deliberately.
test-slow: $(STAMP)
	$(PY) -m pytest -m slow

# The operations suites CI runs after `make test`: crashes, bad input, read loop, credentials, dbt docs,
# a non-editable install of the project into a fresh venv running the demo, and the example notebooks.
test-ops: $(STAMP) browser
	$(PY) -m pytest -m slow tests/faults tests/test_security.py tests/ui tests/packaging tests/examples

# The UI test drives Debian's Chromium; install it (and its driver) when missing.
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)

# dbt docs of the demo study's published warehouse: demo_run/study/eocausal_work/docs/static_index.html
docs: $(STAMP)
	$(VENV)/bin/eocausal docs demo_run/study/study.yaml

# The UI binds to loopback only.
dev: $(STAMP)
	mkdir -p .dagster_home && cp dagster.yaml .dagster_home/dagster.yaml
	DAGSTER_HOME=$(CURDIR)/.dagster_home $(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1

bench: $(STAMP)
	$(PY) benchmarks/embeddings.py

# On a machine with a CUDA GPU (and a CUDA build of torch): the same table plus checks, < 5 min.
bench-gpu: $(STAMP)
	$(PY) benchmarks/embeddings_gpu.py

clean:
	rm -rf demo_run dbt_project/target dbt_project/logs .pytest_cache
