# The first two targets are the README's first two commands.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-slow lint bench mutation gpu-check gpu-wheels clean

demo: $(VENV)/.installed
	$(BIN)/python run.py experiment=demo

test: $(VENV)/.installed-test
	WANDB_MODE=disabled HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

# Minutes-long tests (a Slurm timeout → requeue → resume); CI runs them after `make test`.
test-slow: $(VENV)/.installed-test
	WANDB_MODE=disabled HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slow

lint: $(VENV)/.installed-test
	$(BIN)/ruff check pcamx tests scripts hydra_plugins benchmarks run.py

bench: $(VENV)/.installed-bench
	$(BIN)/python -m benchmarks

# Planted bugs, automatically: mutmut over the modules users trust for arithmetic ([tool.mutmut] in
# pyproject.toml), then the score per module. Not in CI (about half an hour on 2 cores); see docs/testing.md.
mutation: $(VENV)/.installed-test
	$(BIN)/python -m pip install -q mutmut==3.8.1
	OMP_NUM_THREADS=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1 $(BIN)/mutmut run --max-children 2 > mutants.log 2>&1 \
		|| { tail -c 2000 mutants.log; exit 1; }
	$(BIN)/python scripts/mutation_score.py --survivors

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
	rm -rf $(VENV) outputs multirun mutants mutants.log
