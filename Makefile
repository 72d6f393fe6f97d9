# entra-authz: two commands matter, `make demo` and `make test`. Everything they need is installed here.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
ARGS    ?=

.PHONY: all venv lock demo test lint typecheck pytest protos check-protos bench clean system-deps test-deps redis-server

all: test

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# The tested set, pinned with hashes (requirements.lock, from `make lock`), then the package alone.
$(STAMP): $(BIN)/python pyproject.toml requirements.lock
	$(BIN)/pip install -q --require-hashes -r requirements.lock
	@# xds-protos (test extra) ships its own, older copy of opentelemetry/proto/*; which copy wins
	@# depends on pip's install order. Reinstall opentelemetry-proto (same pin and hashes) last so
	@# the OTLP exporter finds the messages it imports (InstrumentationScope, ...).
	awk '/^opentelemetry-proto==/{p=1;print;next} p&&/^ +--hash/{print;next} {p=0}' requirements.lock > $(VENV)/otel-proto.txt
	$(BIN)/pip install -q --require-hashes --no-deps --force-reinstall -r $(VENV)/otel-proto.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

# Regenerate requirements.lock from pyproject.toml (after changing a dependency; commit both).
# pip-tools runs in its own environment so it never ends up in the locked one.
LOCK_TOOLS := $(VENV)/lock-tools
lock: $(BIN)/python
	test -x $(LOCK_TOOLS)/bin/pip-compile || \
	  { $(PY) -m venv $(LOCK_TOOLS) && $(LOCK_TOOLS)/bin/pip install -q pip-tools; }
	$(LOCK_TOOLS)/bin/pip-compile -q --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links \
	  --extra test --extra demo --extra otel -o requirements.lock pyproject.toml

# wrk (benchmarks) comes from Debian; install it when missing and we are allowed to.
system-deps:
	@command -v wrk >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y -q wrk >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q wrk >/dev/null; }; \
	  elif command -v sudo >/dev/null 2>&1; then sudo apt-get install -y -q wrk >/dev/null; \
	  else echo "wrk is missing: apt-get install wrk (only the benchmark needs it)"; fi; }

# promtool (tests/artefacts/test_monitoring.py checks the alert rules with it) is in Debian's
# `prometheus` package; kubectl (kustomize for tests/artefacts/test_k8s_manifests.py) is in the
# machine image. Install promtool when missing and we are allowed to.
test-deps:
	@command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends prometheus >/dev/null; }; \
	  elif command -v sudo >/dev/null 2>&1; then sudo apt-get install -y -q --no-install-recommends prometheus >/dev/null; \
	  else echo "promtool is missing: apt-get install prometheus (tests/artefacts/test_monitoring.py needs it)"; fi; }

# redis-server (rate-limit tests, the demo) comes from Debian too; same pattern.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y -q redis-server >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q redis-server >/dev/null; }; \
	  elif command -v sudo >/dev/null 2>&1; then sudo apt-get install -y -q redis-server >/dev/null; \
	  else echo "redis-server is missing: apt-get install redis-server"; exit 1; fi; }

demo: venv redis-server
	$(BIN)/authz demo $(ARGS)

protos: venv
	$(BIN)/python -m authz._protogen

lint: venv
	$(BIN)/ruff check authz tests bench
	$(BIN)/ruff format --check authz tests bench

typecheck: venv
	$(BIN)/mypy

# Coverage: >= 85 % of authz/ (branches, subprocesses included), and every line and branch of the
# decision core (authz/policy/, authz/identity/), read from the same run's data.
CORE_COVERAGE := authz/policy/*,authz/identity/*
pytest: venv test-deps redis-server
	$(BIN)/pytest -q -p no:cacheprovider --cov --cov-branch --cov-report=term --cov-fail-under=85 $(PYTEST_ARGS)
	$(BIN)/coverage report --include='$(CORE_COVERAGE)' --show-missing --fail-under=100

test: lint typecheck pytest

bench: venv system-deps redis-server
	$(BIN)/python -m bench $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage htmlcov *.egg-info
