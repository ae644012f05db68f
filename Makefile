# Two commands on a fresh machine:  `make sim`  and  `make test`.
# Both bootstrap .venv (Python >= 3.11) on first use.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
STAMP = $(VENV)/.haif-installed

.PHONY: sim test lint check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,otlp]'
	touch $(STAMP)

sim: $(STAMP)
	$(BIN)/haif sim scenarios/failover.yaml

test: $(STAMP)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check haif tests bench
	$(BIN)/ruff format --check haif tests bench
	$(BIN)/mypy

check: lint test

clean:
	rm -rf $(VENV) reports/failover .haif
