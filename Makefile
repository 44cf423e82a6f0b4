# vitrine — `make run` runs the loop on the embedded default; `make test` passes the tests.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STATE ?= $(or $(VITRINE_HOME),.vitrine)
DATASET_DIR := /usr/share/datasets/fashion-mnist
LOCAL_DATASET := $(STATE)/debian$(DATASET_DIR)
PYTEST_ARGS ?=

# Telemetry of every tool is switched off in one place, components/config.py TELEMETRY_OFF,
# by every entry point (the vitrine CLI, the service, the tests, the benchmarks).

.PHONY: help setup dataset browser postgres run serve test test-unit lint format ui status clean deploy worker

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: $(VENV)/.installed $(VENV)/.compiled dataset  ## virtualenv from requirements.lock + the Fashion-MNIST dataset

$(VENV)/.installed: requirements.lock pyproject.toml
	python3 -m venv $(VENV)
	@if [ -n "$$PIP_FIND_LINKS" ]; then \
	  $(BIN)/pip install -q uv==0.13.9 && \
	  $(BIN)/uv pip install --python $(PY) --find-links "$$PIP_FIND_LINKS" -r requirements.lock; \
	else \
	  $(BIN)/pip install -q -r requirements.lock; \
	fi
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

# The installed packages' bytecode, once. uv installs none, and where PYTHONDONTWRITEBYTECODE
# is set no process caches its own, so every Python started (each bentoml worker, mlflow and
# prefect servers, the vitrine CLI in a subprocess) compiled torch, transformers and mlflow
# from source again: 30 of a worker's 55 s start. (The one file skipped is Python 3.12 syntax.)
$(VENV)/.compiled: $(VENV)/.installed
	$(PY) -m compileall -q -j 0 -x 'torch/testing/_internal/py312_intrinsics\.py' $(VENV)/lib
	touch $@

dataset:  ## Debian's dataset-fashion-mnist (apt-get as root; apt-get download + dpkg-deb -x otherwise)
	@if [ -f $(DATASET_DIR)/train-images-idx3-ubyte.gz ] || [ -f $(LOCAL_DATASET)/train-images-idx3-ubyte.gz ]; then \
	  exit 0; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	  { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }; \
	else \
	  mkdir -p $(STATE)/debian && cd $(STATE)/debian && apt-get download dataset-fashion-mnist && \
	  dpkg-deb -x dataset-fashion-mnist_*.deb . ; \
	fi

run: setup  ## the retrain loop on the embedded default (full Fashion-MNIST), then a summary
	$(BIN)/vitrine run --json $(STATE)/last-run.json

serve: setup  ## BentoML service of the champion on 127.0.0.1:3000 (API + page at /)
	$(BIN)/vitrine serve $(if $(PORT),--port $(PORT))

browser:  ## Debian's chromium + chromedriver for the page's browser test (root: apt-get)
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then \
	  exit 0; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 || \
	  { apt-get update -qq && apt-get install -y -qq chromium chromium-driver; }; \
	else \
	  echo "the browser test needs Debian's chromium and chromium-driver:" \
	       "sudo apt-get install chromium chromium-driver" >&2; exit 1; \
	fi

postgres:  ## Debian's PostgreSQL server, for the scale tests (they start a cluster of their own)
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null; then \
	  exit 0; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y -qq postgresql >/dev/null 2>&1 || \
	  { apt-get update -qq && apt-get install -y -qq postgresql; }; \
	else \
	  echo "the scale tests need Debian's PostgreSQL server: sudo apt-get install postgresql" >&2; \
	  exit 1; \
	fi

test: setup browser postgres lint  ## make lint, then every test tier
	$(BIN)/pytest -q --durations=25 $(PYTEST_ARGS)

test-unit: setup  ## unit tests only
	$(BIN)/pytest -q -m "not integration and not data and not slow and not serving and not model" $(PYTEST_ARGS)

lint: setup  ## ruff lint + format check + the layer contract (import-linter, pyproject.toml)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports --no-cache

format:  ## ruff fix + format
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

ui: setup  ## MLflow UI (:5000) and Prefect server (:4200) on 127.0.0.1
	$(BIN)/vitrine ui

deploy: setup  ## Prefect deployments (retrain nightly, monitor hourly, promote every 10 min) on the `make ui` server
	$(BIN)/vitrine deploy

worker: setup  ## Prefect process worker that executes the deployments' scheduled runs (foreground)
	$(BIN)/vitrine worker

status: setup  ## champion, challenger, gate verdict, approval
	$(BIN)/vitrine status

clean:  ## remove the state folder and the work folder (keeps data/)
	rm -rf $(STATE) work
