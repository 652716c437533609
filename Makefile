# Quick start:  `make demo` (set up + main job)   `make test` (set up + test suite)
# Set-up creates .venv if missing and installs the project. On CPU-only machines the constraints
# file pins the local CPU wheel of torch; GPU users: `make demo TORCH_CONSTRAINT=` to skip it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_CONSTRAINT ?= constraints/cpu.txt
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow bench clean

$(STAMP): pyproject.toml $(TORCH_CONSTRAINT)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(if $(TORCH_CONSTRAINT),-c $(TORCH_CONSTRAINT)) -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/spo demo --output runs/demo

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow || [ $$? -eq 5 ]  # exit 5 = no slow test collected

clean:
	rm -rf runs .pytest_cache
