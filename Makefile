# Two commands on a fresh machine:  `make sim`  and  `make test`.
# Both bootstrap .venv (Python >= 3.11) on first use. `make test-fast` is the
# quick loop: the suite without the `cluster`, `postgres` and `slow` tests.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
STAMP = $(VENV)/.haif-installed

.PHONY: sim test test-fast chaos lint check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,otlp]'
	touch $(STAMP)

sim: $(STAMP)
	$(BIN)/haif sim scenarios/failover.yaml

test: $(STAMP)
	$(BIN)/pytest -q -m "not chaos"

chaos: $(STAMP)
	$(BIN)/pytest -q -s -m chaos tests/chaos

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not cluster and not postgres and not slow"

lint: $(STAMP)
	$(BIN)/ruff check haif tests bench
	$(BIN)/ruff format --check haif tests bench
	$(BIN)/mypy

check: lint test

clean:
	rm -rf $(VENV) reports/failover .haif
