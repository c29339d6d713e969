# neurojepa_pl: `make help` lists the targets.
# Every target works on a fresh machine: it creates .venv and installs the project (CPU torch pinned) first.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install demo test test-fast lint bench clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# CPU wheel pinned: a plain `torch` resolves to a multi-GB CUDA build. GPU users: install torch first, then `pip install -e .`.
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[dev]"
	touch $@

install: $(VENV)/.installed ## create .venv and install the project with CPU torch

demo: install ## SynthBrain cohort -> JEPA pretraining -> probe table (2 CPU cores)
	$(VENV)/bin/neurojepa synth --out $(DEMO_DIR)/synthbrain --subjects 48 --seed 0 --grid model
	$(PY) -m neurojepa_pl.demo --workdir $(DEMO_DIR)

test: install ## run the test suite (the command CI runs)
	$(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

test-fast: install ## tests without the slow tier
	$(PY) -m pytest -m "not gpu and not slow" $(PYTEST_ARGS)

lint: install ## byte-compile everything and check imports
	$(PY) -m compileall -q neurojepa_pl data_modules callbacks benchmarks tests

bench: install ## CPU benchmarks (print JSON with ratios against in-run baselines)
	$(PY) benchmarks/moe_dispatch.py --device cpu
	$(PY) benchmarks/data_loader.py
	$(PY) benchmarks/pretrain_step.py --device cpu --preset tiny

clean: ## remove build artefacts, caches and demo runs (keeps .venv)
	rm -rf build dist *.egg-info .pytest_cache runs lightning_logs
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
