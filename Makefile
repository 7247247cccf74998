# labkit — two commands do everything on a fresh machine:
#   make labs   create .venv, install, run every notebook on the offline default, write results/
#   make test   install what the tests need, run the whole suite (unit, contract, browser, nbval)
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.labkit-installed
# Notebooks nbval checks; `LABKIT_QUICK=1` shrinks trials and turns so CI stays in budget.
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb))
PYTEST_ARGS ?=

.PHONY: help install labs test test-fast lint bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Re-install when the dependency list changes. llama-cpp-python compiles from source the
# first time (4-10 minutes on 2 cores); pip's wheel cache makes later installs take seconds.
$(STAMP): pyproject.toml | $(VENV)/bin/python
	@echo "Installing labkit and its dependencies into $(VENV) (the first build of llama-cpp-python takes several minutes)..."
	$(PY) -m pip install --progress-bar off -e ".[test]"
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install labkit with its test tools

labs: $(STAMP)  ## run every notebook top to bottom on the offline default; write results/
	$(VENV)/bin/labkit labs

test: $(STAMP)  ## run the whole test suite, notebooks included (nbval)
	$(VENV)/bin/ruff check labkit tests benchmarks
	LABKIT_QUICK=1 $(PY) -m pytest -p no:cacheprovider -ra $(PYTEST_ARGS) tests $(if $(NOTEBOOKS),--nbval-lax --nbval-current-env --nbval-cell-timeout=900 --nbval-sanitize-with tests/nbval_sanitize.cfg $(NOTEBOOKS))

test-fast: $(STAMP)  ## unit and contract tests only: no real model, no browser, no notebooks
	$(PY) -m pytest -p no:cacheprovider -ra -m "not slow and not llama and not browser" tests

lint: $(STAMP)  ## ruff
	$(VENV)/bin/ruff check labkit tests benchmarks
	$(VENV)/bin/ruff format --check labkit tests benchmarks

bench: $(STAMP)  ## run every benchmark script and print its figures
	@for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:  ## remove .venv and caches (results/ and notebooks are kept)
	rm -rf $(VENV) .pytest_cache .ruff_cache
