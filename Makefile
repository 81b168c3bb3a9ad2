# Two commands on a fresh machine: `make demo` and `make test`.
# torch is installed from the pinned CPU build first so the range in pyproject.toml
# is already satisfied and pip does not pull the CUDA wheels.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0

$(BIN)/headwater: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

.PHONY: install demo test bench
install: $(BIN)/headwater

demo: install
	$(BIN)/headwater demo

test: install
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/ruff check src tests benchmarks
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/throughput.py
