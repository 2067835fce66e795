# Two commands: `make demo` and `make test`. Both create .venv when missing and install the pinned
# project into it (pyproject.toml pins direct dependencies, requirements.lock the rest).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NPROC ?= 2

.PHONY: setup demo test test-fast lint lock clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev]'
	@# DeepSpeed JIT-compiles its CPU ranks' shared-memory all-reduce at the first launch (~1 min on
	@# 2 cores, then cached in ~/.cache/torch_extensions): build it here, so that the demo's clock
	@# and the tests' timeouts do not pay for it.
	DS_ACCELERATOR=cpu $(BIN)/python -c 'from deepspeed.comm.torch import build_shm_op; build_shm_op()'
	@touch $(STAMP)

demo: setup
	NPROC=$(NPROC) PYTHON=$(BIN)/python launch/local.sh --config configs/demo.yaml

lint: setup
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest

test-fast: lint
	$(BIN)/python -m pytest -m "not slow"

# Refresh the lock after changing pins in pyproject.toml.
lock: setup
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^lipflow' > requirements.lock

clean:
	rm -rf $(VENV) runs .pytest_cache
