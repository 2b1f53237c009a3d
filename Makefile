# The two commands: `make demo` runs the vlmstack app on the shipped models, `make test`
# runs the lint and format checks (ruff) and the tests. Both create .venv/ first (once;
# again when pyproject.toml changes).
VENV := .venv
BIN := $(VENV)/bin
PYTHON ?= python3

.PHONY: demo test setup

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# The tests also cover the Ray engine: the `ray` extra, installed once. open-flamingo is the
# reference of `vlmstack import openflamingo`; its wheel pins torch 2.0.1, hence --no-deps.
$(BIN)/.installed-ray: $(BIN)/.installed
	$(BIN)/pip install --quiet -e '.[test,ray]'
	$(BIN)/pip install --quiet --no-deps open-flamingo einops einops-exts
	touch $@

setup: $(BIN)/.installed

test: $(BIN)/.installed-ray
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

demo: setup
	$(BIN)/vlmstack app
