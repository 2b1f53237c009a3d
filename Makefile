# The two commands: `make demo` runs vlmstack on the shipped models, `make test` runs the tests.
# Both create .venv/ first (once; again when pyproject.toml changes).
VENV := .venv
BIN := $(VENV)/bin
PYTHON ?= python3

.PHONY: demo test setup

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

setup: $(BIN)/.installed

test: setup
	$(BIN)/python -m pytest

demo: setup
	$(BIN)/vlmstack eval clip --model clip-easyvqa --data easyvqa:test
