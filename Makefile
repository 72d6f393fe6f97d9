# entra-authz: two commands matter, `make demo` and `make test`. Everything they need is installed here.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
ARGS    ?=

.PHONY: all venv demo test lint typecheck pytest protos check-protos bench clean system-deps redis-server

all: test

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# wrk (benchmarks) comes from Debian; install it when missing and we are allowed to.
system-deps:
	@command -v wrk >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y -q wrk >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q wrk >/dev/null; }; \
	  elif command -v sudo >/dev/null 2>&1; then sudo apt-get install -y -q wrk >/dev/null; \
	  else echo "wrk is missing: apt-get install wrk (only the benchmark needs it)"; fi; }

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

pytest: venv redis-server
	$(BIN)/pytest -q -p no:cacheprovider --cov --cov-branch --cov-report=term --cov-fail-under=85 $(PYTEST_ARGS)

test: lint typecheck pytest

bench: venv system-deps redis-server
	$(BIN)/python -m bench $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage htmlcov *.egg-info
