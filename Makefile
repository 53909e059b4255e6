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

# The training-heavy modules run in a second pytest process, with a Ray of their own: in one
# process, after the whole suite's Ray Data / Ray Train / Serve work, a new Ray Data actor pool in
# test_predict waited forever for its actor's ALIVE notification (Ray 2.60; the actor was up).
TRAINING_TESTS := tests/test_candidates_job.py tests/test_generation_training.py tests/test_causal_training.py \
	tests/test_train_stages.py \
	tests/test_quickstart.py tests/test_real_weights.py

test: setup
	$(PY) -m pytest -q -m "not gpu" tests $(foreach f,$(TRAINING_TESTS),--ignore=$(f))
	$(PY) -m pytest -q -m "not gpu" $(TRAINING_TESTS)

test-all: setup
	$(PY) -m pytest -q tests $(foreach f,$(TRAINING_TESTS),--ignore=$(f))
	$(PY) -m pytest -q $(TRAINING_TESTS)

bench: setup
	$(PY) -m benchmarks.run_all

clean:
	rm -rf runs bench_out .pytest_cache
