# labkit — two commands do everything on a fresh machine:
#   make labs   create .venv, install, run every notebook on the offline default, write results/
#   make test   install what the tests need, run the whole suite (unit, contract, browser, nbval)
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.labkit-installed
# Notebooks nbval checks; `LABKIT_QUICK=1` shrinks trials and turns so CI stays in budget, and
# their results go to a temporary folder so `make test` never overwrites the committed results/.
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb))
PYTEST_ARGS ?=

.PHONY: help install labs test test-fast lint bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# llama-cpp-python has no wheel on PyPI: it compiles from source (4-10 minutes on 2 cores).
# Its default build targets `-march=native`, which crashed (SIGSEGV in the first decode) on
# an AMX-capable Xeon VM, so labkit builds it once for portable AVX2 into a wheel folder
# outside the checkout, reused by every later install and fresh clone on this machine.
# Override LLAMA_CMAKE_ARGS (and LLAMA_WHEELS) to build it your way.
LLAMA_VERSION    := 0.3.36
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
LLAMA_WHEELS     ?= $(HOME)/.cache/labkit/wheels/avx2
LLAMA_WHEEL       = $(firstword $(wildcard $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl))

# Re-install when the dependency list changes.
$(STAMP): pyproject.toml Makefile | $(VENV)/bin/python
	@if [ -z "$(LLAMA_WHEEL)" ]; then \
	  echo "Building llama-cpp-python $(LLAMA_VERSION) (portable AVX2; once per machine, several minutes)..."; \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip wheel --progress-bar off --no-deps --no-cache-dir \
	    "llama-cpp-python==$(LLAMA_VERSION)" -w "$(LLAMA_WHEELS)"; \
	fi
	@echo "Installing labkit and its dependencies into $(VENV)..."
	$(PY) -m pip install --progress-bar off --find-links "$(LLAMA_WHEELS)" -e ".[test]"
	@$(PY) -c "import llama_cpp, sys; sys.exit(0)"
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install labkit with its test tools

labs: $(STAMP)  ## run every notebook top to bottom on the offline default; write results/
	$(VENV)/bin/labkit labs

test: $(STAMP)  ## run the whole test suite, notebooks included (nbval)
	$(VENV)/bin/ruff check labkit tests benchmarks
	LABKIT_QUICK=1 LABKIT_RESULTS_DIR=$${LABKIT_RESULTS_DIR:-$$(mktemp -d)} $(PY) -m pytest -p no:cacheprovider -ra $(PYTEST_ARGS) tests $(if $(NOTEBOOKS),--nbval-lax --nbval-current-env --nbval-cell-timeout=900 --nbval-sanitize-with tests/nbval_sanitize.cfg $(NOTEBOOKS))

test-fast: $(STAMP)  ## unit and contract tests only: no real model, no browser, no notebooks
	$(PY) -m pytest -p no:cacheprovider -ra -m "not slow and not llama and not browser" tests

lint: $(STAMP)  ## ruff
	$(VENV)/bin/ruff check labkit tests benchmarks
	$(VENV)/bin/ruff format --check labkit tests benchmarks

bench: $(STAMP)  ## run every benchmark script and print its figures
	@for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:  ## remove .venv and caches (results/ and notebooks are kept)
	rm -rf $(VENV) .pytest_cache .ruff_cache
