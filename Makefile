# The README's two commands are `make demo` and `make test`; both run `setup` first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export TOKENIZERS_PARALLELISM ?= false
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: setup demo test test-all bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/re2g demo

test: setup
	$(PY) -m pytest -q -m "not gpu" tests

test-all: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) -m benchmarks.run_all

clean:
	rm -rf runs bench_out .pytest_cache
