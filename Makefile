# karbor-async: the two set-up commands are `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-lowest lint bench bench-quick bench-million bench-headline venv clean

venv: $(STAMP)

# Every package under plugins/ (each folder with a pyproject.toml) is installed.
PLUGINS := $(patsubst %/pyproject.toml,%,$(wildcard plugins/*/pyproject.toml))

$(STAMP): pyproject.toml $(wildcard plugins/*/pyproject.toml)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]' $(addprefix -e ./,$(PLUGINS))
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/karbor-async demo

test: $(STAMP)
	$(BIN)/python -m pytest

# The declared dependency range, tested at its bottom: a virtualenv of its own (LOWEST,
# made afresh each time) with every runtime dependency of the project (and of the
# postgres, temporal and testing extras) and of plugins/ at its lowest declared version (uv's
# lowest-direct resolution; uv comes from PyPI into the TOOLS virtualenv), the test
# tools at their latest (constrained to keep those floors), and the tests that are
# neither slow nor need a service. tests/floors.py prints each floor beside the
# installed version first, and fails if one is not at its floor.
# (UV=/path/to/uv takes a uv of your own.)
LOWEST ?= .venv-lowest
TOOLS ?= .venv-tools
UV ?= $(TOOLS)/bin/uv
LOWEST_EXTRAS := postgres,temporal,testing
LOWEST_TOOLS := pytest pytest-timeout hypothesis trio
LOWEST_ARGS ?= -m "not slow and not service" --durations=10
comma := ,

$(UV):
	test -x $(TOOLS)/bin/python || $(PY) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet 'uv>=0.5'

test-lowest: export UV_PYTHON_DOWNLOADS := never
test-lowest: $(UV)
	rm -rf $(LOWEST)
	$(UV) venv --quiet --python $(PY) $(LOWEST)
	$(UV) pip install --quiet --python $(LOWEST)/bin/python --resolution lowest-direct \
	  -e '.[$(LOWEST_EXTRAS)]' $(addprefix -e ./,$(PLUGINS))
	$(UV) pip freeze --python $(LOWEST)/bin/python > $(LOWEST)/resolved.txt
	grep -v '^-e ' $(LOWEST)/resolved.txt > $(LOWEST)/constraints.txt
	$(UV) pip install --quiet --python $(LOWEST)/bin/python -c $(LOWEST)/constraints.txt \
	  $(LOWEST_TOOLS)
	$(LOWEST)/bin/python tests/floors.py $(subst $(comma), ,$(LOWEST_EXTRAS))
	$(LOWEST)/bin/python -m pytest $(LOWEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src plugins tests benchmarks
	$(BIN)/ruff format --check src plugins tests benchmarks
	$(BIN)/mypy

# The full run (by hand; ~40 minutes on 2 cores) also writes README.md's headline block.
bench: $(STAMP)
	$(BIN)/python -m benchmarks

# CI's smoke run: small sizes, both collector treatments, under 2 minutes.
bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks --quick

# 1,000 to 1,000,000 resources, one run each (not in CI): benchmarks/MILLION.md and million.png.
bench-million: $(STAMP)
	$(BIN)/python -m benchmarks.million

# README.md's headline block again from benchmarks/RESULTS.md.
bench-headline: $(STAMP)
	$(BIN)/python -m benchmarks.headline

clean:
	rm -rf $(VENV) $(LOWEST) $(TOOLS) .mypy_cache .ruff_cache .pytest_cache .hypothesis
