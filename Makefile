# karbor-async: the two set-up commands are `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-quick bench-million bench-headline venv clean

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
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
