# Two entry points for a fresh machine: `make demo` and `make test`. Both build .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# qtorch compiles C++ on first import; keep its build cached between runs.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/dpquant-sim/torch_extensions
PYTEST_ARGS ?=

.PHONY: venv demo test test-slow test-all bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml .ci/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c .ci/constraints.txt -e ".[test,qtorch,ray]"
	touch $@

demo: venv
	$(VENV)/bin/dpquant-sim demo --out runs/demo

test: venv
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: venv
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

test-all: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: venv
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
