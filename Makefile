# Set-up and the two main jobs. torch is pinned and installed first with pip (an
# unpinned torch would pull a multi-GB CUDA build, and only pip sees the local CPU
# wheel); uv installs the rest in seconds where pip took minutes.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PROMPT ?= In one sentence, what is the capital of France?

.PHONY: setup browser demo test test-all lint bench
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q uv
	$(BIN)/uv pip install -q --python $(BIN)/python -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/shardwise generate "$(PROMPT)" --stages 2

# Debian's Chromium, for the dashboard's browser tests (they skip, saying why, where it cannot be had)
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "could not install chromium (apt-get needs root): the dashboard's browser tests will skip"

# `make test` (CI's, ~20 minutes on 2 cores) leaves out the tests marked slow; `make test-all` runs
# every test (~35 minutes): the lab's closed loop, the dead node, quality, and the like.
# (bytecode caches written even where the environment says not to, as in CI: the tests start
# hundreds of Python processes - Ray workers, stages, CLIs, servers - each ~2 s faster with them)
TESTS ?= not slow
test: setup browser
	$(BIN)/ruff check src tests benchmarks
	PYTHONDONTWRITEBYTECODE= $(BIN)/pytest -q --durations=30 -m "$(TESTS)"

test-all: TESTS = slow or not slow
test-all: test

# llama-cpp-python without llama.cpp's AMX kernels, which crash on multi-token batches on
# Sapphire-Rapids-class CPUs (see benchmarks/llama_server.py; x86 only: other compilers lack the flags)
NO_AMX = $(if $(filter x86_64,$(shell uname -m)),-mno-amx-tile -mno-amx-int8 -mno-amx-bf16)
bench: setup
	$(BIN)/uv pip install -q --python $(BIN)/python -C cmake.define.CMAKE_C_FLAGS="$(NO_AMX)" \
		-C cmake.define.CMAKE_CXX_FLAGS="$(NO_AMX)" -e '.[dev,bench]'
	$(BIN)/python benchmarks/engine.py
	$(BIN)/python benchmarks/decode.py
	$(BIN)/python benchmarks/pipeline.py
	$(BIN)/python benchmarks/estimate_vs_measured.py
	$(BIN)/python benchmarks/planner.py
	$(BIN)/python benchmarks/serve.py
	$(BIN)/python benchmarks/recovery.py
