# The first two targets are the README's first two commands.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-slow lint bench gpu-check gpu-wheels clean

demo: $(VENV)/.installed
	$(BIN)/python run.py experiment=demo

test: $(VENV)/.installed-test
	WANDB_MODE=disabled HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

# Minutes-long tests (a Slurm timeout → requeue → resume); CI runs them after `make test`.
test-slow: $(VENV)/.installed-test
	WANDB_MODE=disabled HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slow

lint: $(VENV)/.installed-test
	$(BIN)/ruff check pcamx tests scripts hydra_plugins run.py

bench: $(VENV)/.installed-bench
	$(BIN)/python -m pcamx.bench

# On a GPU machine (its own python3 has torch; the rest comes from .whl): make gpu-check [GPU_CHECK_ARGS=--quick]
gpu-check:
	scripts/gpu_check.sh $(GPU_CHECK_ARGS)

# Here, before going to the GPU machine: the wheels it lacks, for Python 3.12 manylinux x86-64, into .whl/
gpu-wheels: $(VENV)/.installed
	PYTHON=$(BIN)/python scripts/gpu_wheels.sh .whl

$(VENV)/bin/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed

$(VENV)/.installed-bench: pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[bench]'
	touch $@ $(VENV)/.installed

clean:
	rm -rf $(VENV) outputs multirun
