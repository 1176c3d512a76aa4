# The two commands of the README's quick start. Each creates .venv on first use.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install drill test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[embedded,pkcs11,dev]'
	touch $(STAMP)

install: $(STAMP)

drill: $(STAMP)
	$(BIN)/openkcm drill all

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy --strict events plugins

clean:
	rm -rf $(VENV) drill-report .pytest_cache .mypy_cache .ruff_cache .hypothesis
