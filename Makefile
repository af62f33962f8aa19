# Two entry points: `make demo` runs the default sweep, `make test` runs the tests.
# Both create the virtual environment from requirements.lock when it is missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test test-all lint clean chromium postgresql gpu-check docs bytecode

$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c requirements.lock -e ".[dev]"
	touch $@

demo: $(VENV)/.installed bytecode
	$(BIN)/orchestrate grid/smoke.yaml

# The packages' bytecode, written beforehand (only for files changed since): the editable
# install leaves it to the first import, and where PYTHONDONTWRITEBYTECODE is set (as in
# many container images) no import writes it, so every process, each Ray worker included,
# would compile the trial code again as it starts (60-90 ms of CPU here).
PACKAGES := orchestrator workers benchmarks
bytecode:
	$(BIN)/python -m compileall -q $(PACKAGES)

# tests/orchestrator/test_report.py opens the HTML report in headless Chromium: Debian's
# `chromium`, installed here when missing (apt, as root or through sudo). If it cannot be
# installed, the other tests still run and that test fails saying how to get it.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	{ echo "installing Debian's chromium (headless browser for the report test)" && \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) apt-get install -y -qq --no-install-recommends chromium >/dev/null; } || \
	echo "warning: could not install chromium: tests/orchestrator/test_report.py will fail"

# tests/orchestrator/test_search_postgres.py starts a throwaway PostgreSQL server
# (tests/postgres_server.py: initdb and postgres, on PATH or under /usr/lib/postgresql/*/bin):
# Debian's `postgresql`, installed here when missing, the same way as chromium.
postgresql:
	@command -v postgres >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || \
	{ echo "installing Debian's postgresql (database server for the shared-search test)" && \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) apt-get install -y -qq --no-install-recommends postgresql >/dev/null; } || \
	echo "warning: could not install postgresql: tests/orchestrator/test_search_postgres.py will fail"

test: $(VENV)/.installed bytecode chromium postgresql
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: $(VENV)/.installed bytecode chromium postgresql
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The GPU acceptance check (docs/gpu_check.md): on a GPU machine it needs no virtual
# environment (the image's python3 and packages); GPU_CHECK_ARGS=--cpu runs it tiny on a CPU.
GPU_CHECK_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
GPU_CHECK_OUT ?= results/gpu_check
gpu-check:
	$(GPU_CHECK_PYTHON) -m benchmarks.gpu_check --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

# The documentation as a static site in site/ (MkDocs, mkdocs.yml; a broken internal
# link fails the build).
docs: $(VENV)/.installed
	$(BIN)/python -m mkdocs build --strict

lint: $(VENV)/.installed
	$(BIN)/ruff check orchestrator workers tests benchmarks

# What make made (the environment, the docs site) and the tools' caches; never results/,
# which holds the user's sweeps.
clean:
	rm -rf $(VENV) site .pytest_cache .ruff_cache
	$(if $(wildcard $(PACKAGES) tests),find $(wildcard $(PACKAGES) tests) -name __pycache__ -prune -exec rm -rf {} +)
